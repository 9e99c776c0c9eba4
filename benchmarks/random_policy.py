"""The floor every Sokoban figure should be read against: a policy that moves uniformly at random.

    python benchmarks/random_policy.py [--tasks 100 --task-seed 900000 --samples 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from leafe.envs import make
from leafe.passk import summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--task-seed", type=int, default=900_000)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/random_policy.json"))
    args = parser.parse_args()
    rng = random.Random(0)
    env = make("sokoban")
    counts = []
    for task in env.make_tasks(args.tasks, args.task_seed):
        solved = 0
        for _ in range(args.samples):
            env.reset(task)
            while True:
                result = env.step(rng.choice(["up", "down", "left", "right"]))
                if result.done:
                    solved += result.success
                    break
        counts.append((args.samples, solved))
    report = {"policy": "uniform random over the four directions", "tasks": args.tasks,
              "task_seed": args.task_seed, "samples": args.samples, **summarize(counts)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["pass_at_k"], indent=1))


if __name__ == "__main__":
    sys.exit(main())
