"""Does our GRPO learn at all? Train on a handful of levels and evaluate on those same levels.

Held-out Pass@1 can stay flat for reasons that are not bugs (a base policy with nothing
generalisable to sharpen); success on the training levels themselves must rise if the gradient,
the advantages and the weight sharing with the sampler are right.

    python benchmarks/grpo_sanity.py --model DIR [--levels 4 --steps 20 --lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from leafe.backends.hf import HFBackend
from leafe.method import Job
from leafe.methods.evaluate import evaluate
from leafe.methods.grpo import train_grpo
from leafe.settings import EvalSettings, GRPOSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--seed", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-grpo-sanity"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/grpo_sanity.json"))
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    settings = GRPOSettings(tasks=args.levels, task_seed=args.seed, steps=args.steps, tasks_per_step=args.levels,
                            learning_rate=args.lr, kl_coef=0.0, save_every=0)
    summary = train_grpo(Job(args.model, args.work / "grpo", device="cpu"), settings).to_dict()
    on_train = EvalSettings(tasks=args.levels, task_seed=args.seed, samples=args.samples, ks=[1, args.samples])
    report = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "grpo": summary["cost"]}
    for name, path in (("base", args.model), ("grpo", str(args.work / "grpo"))):
        result = evaluate(Job(path, args.work / f"eval-{name}", backend=HFBackend(path, device="cpu")), on_train).data
        report[name] = {"pass_at_k": result["pass_at_k"], "ci95": result["ci95"]}
        print(f"{name}: Pass@1 on the training levels {100 * result['pass_at_k']['1']:.1f}%", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
