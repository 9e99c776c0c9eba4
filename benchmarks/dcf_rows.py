"""D_cf rows per task from stage 1 with `stop_on_success` on vs off, at the same trees budget.

The paper counts about 3 branching events per task, one D_cf example each (LEAFE.md, stage 2). A
search that stops at its first success keeps only the events before it, and with `cf_from:
successful` (the default) only those on the winning path; the paper's stage 1 (the knob off)
spends the whole budget. This runs `leafe`'s stage 1 twice on the same tasks, model and budget,
once each way, and counts per task: branching events, branches, D_cf rows under both `cf_from`
choices, successful episodes (D_reh's pool), with the success rate and the cost.

    python benchmarks/dcf_rows.py [--model DIR] [--tasks 32 --budget 60] [--reflector policy] [--out FILE]
    python benchmarks/dcf_rows.py --noisy-expert 0.25 [--tasks 32 --budget 60]

`--model` defaults to the embedded base agent (`leafe bootstrap`, built and cached on first use).
`--noisy-expert RATE` needs no model and runs in a minute: a scripted policy that plays the solver's
move, or with probability RATE another one (the demonstrations the embedded agent is pretrained on,
at its default RATE 0.25), with the oracle reflector, since a script cannot reflect. It measures the
tree's mechanics (what each stopping rule leaves for D_cf), not a model.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from leafe.method import Job
from leafe.methods.distill import build_rows
from leafe.methods.explore import explore
from leafe.settings import DistillSettings, ExploreSettings
from leafe.trees import read_trees


def per_task(tree: dict[str, Any]) -> dict[str, int]:
    """What one task's tree gives stage 2."""
    nodes = tree["nodes"]
    return {
        "events": sum(r["branched"] for n in nodes for r in n.reflections),
        "branches": sum(n.parent is not None for n in nodes),
        "cf_successful": len(build_rows([tree], DistillSettings(cf_from="successful", reh_fraction=0))[0]),
        "cf_all": len(build_rows([tree], DistillSettings(cf_from="all", reh_fraction=0))[0]),
        "successful_episodes": sum(n.outcome == "success" for n in nodes),
    }


def noisy_expert_backend(rate: float, seed: int = 0):
    """A ScriptedBackend (tests/helpers.py) whose agent is the solver with mistakes at `rate`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import ScriptedBackend, env_texts, last_board

    from leafe.base_agent.tokenizer import train_tokenizer
    from leafe.envs.sokoban import solve_state
    from leafe.envs.sokoban.levels import ACTIONS

    rng = random.Random(seed)  # calls come in a fixed order, so a run is reproducible

    def reply(text: str, i: int) -> str:
        best = (solve_state(*last_board(text)) or [])[:1]
        action = best[0] if best and rng.random() >= rate else rng.choice([a for a in ACTIONS if a not in best])
        return f"Thought: push on.\nAction: {action}"

    return ScriptedBackend(train_tokenizer(env_texts(), vocab_size=512), reply)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model directory (default: the embedded base agent)")
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--task-seed", type=int, default=5000, help="the study's training levels by default")
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--reflector", default="policy", choices=("policy", "oracle"))
    parser.add_argument("--noisy-expert", type=float, default=None, metavar="RATE",
                        help="no model: the solver with mistakes at RATE plays, the oracle reflects")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-dcf-rows"))
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/dcf_rows_REFLECTOR.json")
    args = parser.parse_args()
    if args.noisy_expert is not None:
        args.model, args.reflector = f"noisy-expert-{args.noisy_expert}", "oracle"
        backend = noisy_expert_backend(args.noisy_expert)
    else:
        from transformers.utils import logging as hf_logging

        from leafe.backends.hf import HFBackend

        hf_logging.set_verbosity_error()
        if args.model is None:
            from leafe.base_agent.bootstrap import ensure_base_agent

            args.model = str(ensure_base_agent())
        backend = HFBackend(args.model, device="cpu")
    name = args.model if args.noisy_expert is not None else args.reflector
    args.out = args.out or Path(f"benchmarks/results/dcf_rows_{name}.json")
    rows = []
    for stop in (True, False):
        settings = ExploreSettings(tasks=args.tasks, task_seed=args.task_seed, budget=args.budget,
                                   reflector=args.reflector, stop_on_success=stop, parallel_tasks=32)
        out = args.work / f"{name}-b{args.budget}-{'stop' if stop else 'grow'}"
        started = time.perf_counter()
        summary = explore(Job(args.model, out, backend=backend), settings).data
        counts = [per_task(tree) for tree in read_trees(out / "trees.jsonl")]
        row: dict[str, Any] = {"stop_on_success": stop, "success_rate": summary["success_rate"],
                               "ci95": summary["ci95"], "env_steps": summary["env_steps"],
                               "wall_s": round(time.perf_counter() - started, 1)}
        for key in counts[0]:
            values = [c[key] for c in counts]
            row[key] = {"total": sum(values), "per_task": round(sum(values) / len(values), 2),
                        "median": statistics.median(values), "max": max(values)}
        rows.append(row)
        print(f"stop_on_success={stop!s:5}  solved {100 * row['success_rate']:.0f}%  steps {row['env_steps']}  "
              + "  ".join(f"{k} {row[k]['per_task']}/task" for k in counts[0]) + f"  {row['wall_s']}s", flush=True)
    print("\n| stop_on_success | solved | env steps | events / task | branches / task | D_cf rows / task "
          "(cf_from successful) | D_cf rows / task (all) | successful episodes / task | wall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["ci95"]
        print(f"| {'on' if r['stop_on_success'] else 'off'} | {100 * r['success_rate']:.0f}% [{100 * lo:.0f}, "
              f"{100 * hi:.0f}] | {r['env_steps']} | {r['events']['per_task']} | {r['branches']['per_task']} | "
              f"{r['cf_successful']['per_task']} ({r['cf_successful']['total']}) | {r['cf_all']['per_task']} "
              f"({r['cf_all']['total']}) | {r['successful_episodes']['per_task']} | {r['wall_s']:.0f} s |")
    report = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "model": args.model,
              "tasks": args.tasks, "task_seed": args.task_seed, "budget": args.budget, "reflector": args.reflector,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
