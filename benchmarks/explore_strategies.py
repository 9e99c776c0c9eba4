"""Stage 1 at a fixed budget: independent vs refine vs leafe, success within the same env steps.

The paper's stage-1 comparison (CodeContests Pass@128: independent 48.7 < refinement 49.5 < LEAFE
54.3) on our testbed: held-out Sokoban levels, the same model, the same env-step budget per task.
Also measures the replay cost of rolling back without snapshots, and the prefill saved by prefix reuse.

    python benchmarks/explore_strategies.py --model DIR [--tasks 100 --budgets 30 60] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from leafe.backends.hf import HFBackend
from leafe.method import Job
from leafe.methods.explore import explore
from leafe.settings import ExploreSettings

KEYS = ("success_rate", "ci95", "env_steps", "replayed_steps", "reflections", "reflections_parsed", "branches",
        "branches_succeeded", "generated_tokens", "prompt_tokens", "prefill_tokens", "wall_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--task-seed", type=int, default=900_000)
    parser.add_argument("--budgets", type=int, nargs="+", default=[30, 60])
    parser.add_argument("--strategies", nargs="+", default=["independent", "refine", "leafe"])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-explore"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/explore_strategies.json"))
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    backend = HFBackend(args.model, device="cpu")
    rows = []
    runs = [(b, s, True) for b in args.budgets for s in args.strategies]
    runs.append((args.budgets[0], "leafe", False))  # rollback by replay: what snapshots save
    for budget, strategy, snapshots in runs:
        # Success within the budget does not depend on what a task does after its first success;
        # stopping there keeps the cost columns (steps, tokens, wall) the cost of finding it.
        settings = ExploreSettings(strategy=strategy, tasks=args.tasks, task_seed=args.task_seed, budget=budget,
                                   snapshots=snapshots, stop_on_success=True, parallel_tasks=32)
        name = f"{strategy}-b{budget}" + ("" if snapshots else "-replay")
        summary = explore(Job(args.model, args.work / name, backend=backend), settings).data
        row = {"strategy": strategy, "budget": budget, "snapshots": snapshots, **{k: summary[k] for k in KEYS}}
        rows.append(row)
        lo, hi = summary["ci95"]
        print(f"{name:24s} success {100 * summary['success_rate']:5.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]  "
              f"steps {summary['env_steps']}  replayed {summary['replayed_steps']}  branches {summary['branches']} "
              f"({summary['branches_succeeded']} ok)  reflections {summary['reflections_parsed']}/{summary['reflections']}"
              f"  prefill {summary['prefill_tokens']}/{summary['prompt_tokens']}  {summary['wall_s']:.0f}s", flush=True)
    report = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "model": args.model,
              "tasks": args.tasks, "task_seed": args.task_seed, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
