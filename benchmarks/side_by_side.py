"""What `parallel_stages: 2` rests on: two evaluations one after the other (every core each) against
the same two side by side (an equal share of the cores each), on this machine, in one run.

    python benchmarks/side_by_side.py --model AGENT [--tasks 10] [--samples 16] [--rounds 2] \
        --out benchmarks/results/side_by_side.json

Each evaluation is `leafe eval` in its own process, as a study's stage process is; the two of a
pair evaluate other levels (task seeds 900000 and 910000), as two methods' evaluations would play other
models. Rounds alternate the two orders, so a machine whose speed drifts weighs on both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_overhead import machine

from leafe.study.parallel import cpu_cores  # the cores `parallel_stages` shares, counted the same way

SEEDS = (900000, 910000)


def start(model: str, out: Path, seed: int, args: argparse.Namespace, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "leafe", "eval", "--model", model, "--out", str(out), "--tasks", str(args.tasks),
           "--samples", str(args.samples), "--task-seed", str(seed), "--max-batch", str(args.max_batch),
           "--env-param", "max_steps=15", "--env-param", "end_when_lost=true"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait(process: subprocess.Popen) -> None:
    _, err = process.communicate()
    if process.returncode:
        raise SystemExit(f"leafe eval failed: {err.strip().splitlines()[-1] if err.strip() else process.returncode}")


def one_after_the_other(model: str, work: Path, args: argparse.Namespace) -> float:
    started = time.perf_counter()
    for seed in SEEDS:
        wait(start(model, work / f"seq-{seed}", seed, args, cpu_cores()))
    return time.perf_counter() - started


def side_by_side(model: str, work: Path, args: argparse.Namespace) -> float:
    started = time.perf_counter()
    threads = max(1, cpu_cores() // len(SEEDS))
    for process in [start(model, work / f"par-{seed}", seed, args, threads) for seed in SEEDS]:
        wait(process)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    walls: dict[str, list[float]] = {"one after the other": [], "side by side": []}
    for r in range(args.rounds):
        order = [("one after the other", one_after_the_other), ("side by side", side_by_side)]
        for name, run in order if r % 2 == 0 else order[::-1]:
            with tempfile.TemporaryDirectory() as work:
                walls[name].append(round(run(args.model, Path(work), args), 1))
            print(f"round {r + 1}: {name} {walls[name][-1]} s", flush=True)
    medians = {name: statistics.median(w) for name, w in walls.items()}
    ratio = medians["side by side"] / medians["one after the other"]
    print(f"side by side / one after the other: {ratio:.2f}x the wall")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "settings": vars(args) | {"out": str(args.out)},
                                        "walls_s": walls, "median_s": medians, "ratio": round(ratio, 3)}, indent=1))


if __name__ == "__main__":
    main()
