"""Stage 2 ablation: base vs L_reh only vs L_cf + beta L_reh, by Pass@k on held-out levels.

Explores training levels with the `leafe` strategy, distils twice from the same trees (once with
D_cf left out, once with both sets), and evaluates base and both students with `leafe eval`'s code.
The paper's counterpart: ScienceWorld Pass@128, L_reh only 67.3 vs L_cf + L_reh 72.0.

    python benchmarks/distill_ablation.py --model DIR [--train-tasks 400 --eval-tasks 100 --samples 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from leafe.backends.hf import HFBackend
from leafe.method import Job
from leafe.methods.distill import distill
from leafe.methods.evaluate import evaluate
from leafe.methods.explore import explore
from leafe.settings import DistillSettings, EvalSettings, ExploreSettings, SFTSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--train-tasks", type=int, default=400)
    parser.add_argument("--train-seed", type=int, default=5000)
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--eval-tasks", type=int, default=100)
    parser.add_argument("--eval-seed", type=int, default=900_000)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--reh-fraction", type=float, default=0.2)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-distill"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distill_ablation.json"))
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    report: dict = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "args": vars(args) | {
        "work": str(args.work), "out": str(args.out)}}

    backend = HFBackend(args.model, device="cpu")
    started = time.perf_counter()
    summary = explore(Job(args.model, args.work / "explore", backend=backend), ExploreSettings(strategy="leafe", tasks=args.train_tasks,
                                                           task_seed=args.train_seed, budget=args.budget,
                                                           parallel_tasks=32)).data
    report["explore"] = summary | {"wall_s_this_run": round(time.perf_counter() - started, 1)}
    print(f"explore: {100 * summary['success_rate']:.1f}% solved, {summary['branches']} branches "
          f"({summary['branches_succeeded']} ok), {summary['env_steps']} env steps", flush=True)

    trees = [args.work / "explore" / "trees.jsonl"]
    students = {"base": args.model}
    sft = SFTSettings(learning_rate=args.lr, epochs=args.epochs, batch_size=16, max_batch_tokens=8192,
                      logging_steps=5)
    for name, use_cf in (("reh_only", False), ("cf_plus_reh", True)):
        out = args.work / name
        if not (out / "distill.json").exists():
            distill(Job(args.model, out, inputs=trees), DistillSettings(beta=args.beta, reh_fraction=args.reh_fraction,
                                                            use_cf=use_cf), sft)
        info = json.loads((out / "distill.json").read_text())
        report[f"distill_{name}"] = {k: info[k] for k in ("sets", "counts", "wall_s")}
        students[name] = str(out)
        print(f"distill {name}: {info['sets']}", flush=True)

    settings = EvalSettings(tasks=args.eval_tasks, task_seed=args.eval_seed, samples=args.samples, temperature=1.0)
    for name, path in students.items():
        result = evaluate(Job(path, args.work / f"eval-{name}", backend=HFBackend(path, device="cpu")), settings).data
        report[f"eval_{name}"] = {k: result[k] for k in ("pass_at_k", "ci95", "env_steps", "wall_s")}
        k = str(args.samples)
        print(f"{name:12s} Pass@1 {100 * result['pass_at_k']['1']:.1f}%  Pass@{k} {100 * result['pass_at_k'][k]:.1f}%",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
