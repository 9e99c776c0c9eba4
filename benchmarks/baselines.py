"""The baselines against the base agent: GRPO, Early Experience (IWM, SR) and ACE, by Pass@k on
held-out levels, each trained on the same training levels, with its training cost.

Every stage writes into --work and is skipped when its output exists, so a rerun continues.

    python benchmarks/baselines.py --model DIR [--methods grpo iwm sr ace] [--train-tasks 400]
        [--eval-tasks 100 --samples 32] [--base-eval DIR_WITH_EVAL_JSON]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import replace
from pathlib import Path

from leafe.backends.hf import HFBackend
from leafe.method import Job
from leafe.methods.ace import load_playbook, train_ace
from leafe.methods.early_experience import train_early_experience
from leafe.methods.evaluate import evaluate
from leafe.methods.grpo import train_grpo
from leafe.passk import compare_tasks
from leafe.settings import ACESettings, EarlyExperienceSettings, EvalSettings, GRPOSettings, SFTSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--methods", nargs="+", default=["grpo", "iwm", "sr", "ace"])
    parser.add_argument("--train-tasks", type=int, default=400)
    parser.add_argument("--train-seed", type=int, default=5000)
    parser.add_argument("--eval-tasks", type=int, default=100)
    parser.add_argument("--eval-seed", type=int, default=900_000)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--base-eval", type=Path, help="a directory whose eval.json already holds the base's numbers")
    parser.add_argument("--grpo-steps", type=int, default=50)
    parser.add_argument("--grpo-lr", type=float, default=1e-4)
    parser.add_argument("--grpo-tasks-per-step", type=int, default=8)
    parser.add_argument("--grpo-kl", type=float, default=0.01)
    parser.add_argument("--ee-tasks", type=int, help="Early Experience training levels (default: --train-tasks)")
    parser.add_argument("--ee-lr", type=float, default=3e-4)
    parser.add_argument("--ee-epochs", type=float, default=2.0)
    parser.add_argument("--ace-tasks", type=int, help="ACE training levels (default: --train-tasks)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-baselines"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/baselines.json"))
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    report: dict = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "methods": {}}
    if args.out.exists():
        report["methods"] = json.loads(args.out.read_text()).get("methods", {})
    evaluation = EvalSettings(tasks=args.eval_tasks, task_seed=args.eval_seed, samples=args.samples, temperature=1.0)

    def record(name: str, model: str, train: dict | None, playbook: list[str] | None = None) -> None:
        settings = replace(evaluation, playbook=playbook or [])
        result = evaluate(Job(model, args.work / f"eval-{name}", backend=HFBackend(model, device="cpu")), settings).data
        report["methods"][name] = {"pass_at_k": result["pass_at_k"], "ci95": result["ci95"],
                                   "eval_wall_s": result["wall_s"], "train": train, "tasks": result["tasks"]}
        base = report["methods"].get("base")
        if name != "base" and base and base.get("tasks"):  # paired on the same levels
            report["methods"][name]["vs_base"] = compare_tasks(base["tasks"], result["tasks"], list(result["pass_at_k"]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        k = str(args.samples)
        vs = report["methods"][name].get("vs_base")
        paired = (f"  vs base: Pass@1 {100 * vs['1']['diff']:+.1f} [{100 * vs['1']['ci95'][0]:+.1f}, "
                  f"{100 * vs['1']['ci95'][1]:+.1f}] points, paired" if vs else "")
        print(f"{name:6s} Pass@1 {100 * result['pass_at_k']['1']:.1f}%  Pass@{k} {100 * result['pass_at_k'][k]:.1f}%"
              + paired, flush=True)

    if args.base_eval is not None:
        base = json.loads((args.base_eval / "eval.json").read_text())
        report["methods"]["base"] = {"pass_at_k": base["pass_at_k"], "ci95": base["ci95"],
                                     "eval_wall_s": base["wall_s"], "train": None, "from": str(args.base_eval),
                                     "tasks": base["tasks"]}
    else:
        record("base", args.model, None)

    def cost_of(summary: dict) -> dict:
        return {"data": summary["data"], "cost": summary["cost"]}

    for method in args.methods:
        out = args.work / method
        if method == "grpo":
            settings = GRPOSettings(tasks=args.train_tasks, task_seed=args.train_seed, steps=args.grpo_steps,
                                    tasks_per_step=args.grpo_tasks_per_step, learning_rate=args.grpo_lr,
                                    kl_coef=args.grpo_kl, save_every=10)
            summary = train_grpo(Job(args.model, out, device="cpu"), settings).to_dict()
            record("grpo", str(out), cost_of(summary) | {"settings": summary["settings"]})
        elif method in ("iwm", "sr"):
            settings = EarlyExperienceSettings(variant=method, tasks=args.ee_tasks or args.train_tasks,
                                               task_seed=args.train_seed)
            sft = SFTSettings(learning_rate=args.ee_lr, epochs=args.ee_epochs, batch_size=16, max_batch_tokens=8192,
                              logging_steps=20)
            if (out / "train.json").exists():
                summary = json.loads((out / "train.json").read_text())
            else:
                summary = train_early_experience(Job(args.model, out, backend=HFBackend(args.model, device="cpu")), settings,
                                                 sft).to_dict()
            record(method, str(out), cost_of(summary))
        elif method == "ace":
            settings = ACESettings(tasks=args.ace_tasks or args.train_tasks, task_seed=args.train_seed)
            summary = train_ace(Job(args.model, out, backend=HFBackend(args.model, device="cpu")), settings).to_dict()
            record("ace", args.model, cost_of(summary), playbook=load_playbook(out / "playbook.json"))
        else:
            raise SystemExit(f"unknown method {method!r}; use grpo, iwm, sr, ace")
    print(f"-> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
