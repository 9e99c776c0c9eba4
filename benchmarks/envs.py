"""Env speed and rollback cost per env, and the code judge's throughput with and without its sandbox.

    python benchmarks/envs.py [--reps 3] [--out benchmarks/results/envs.json]

- steps/s: random (Sokoban) or reference/wrong (code) actions through `Env.step`, no model;
- rollback: `snapshot` + `restore` vs `replay` of the action prefix (reset + re-step, hash-checked);
- judge: the reference solution of every shipped stdin/stdout problem on all its tests, run (a) in the
  bubblewrap sandbox, (b) with rlimits only (`--unsafe-no-sandbox`), (c) as a bare subprocess.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from leafe.envs import make
from leafe.envs.base import observation_hash, replay
from leafe.envs.code import judge, load_problems
from leafe.envs.sandbox import Sandbox


def sokoban(steps: int = 3000) -> dict:
    env, rng = make("sokoban"), random.Random(0)
    tasks = env.make_tasks(50, 700_000)
    done, started, i = 0, time.perf_counter(), 0
    while done < steps:
        env.reset(tasks[i % len(tasks)])
        i += 1
        finished = False
        while not finished and done < steps:
            finished = env.step(rng.choice(["up", "down", "left", "right"])).done
            done += 1
    rate = done / (time.perf_counter() - started)
    return {"steps_per_s": round(rate, 1), **rollback_cost(env, tasks[0], ["up", "left", "down", "right"] * 3)}


def rollback_cost(env, task, actions: list[str], reps: int = 20) -> dict:
    first = env.reset(task)
    hashes = [observation_hash(first)]
    for a in actions:
        hashes.append(observation_hash(env.step(a).observation))
    started = time.perf_counter()
    for _ in range(reps):
        env.restore(env.snapshot())
    snap = (time.perf_counter() - started) / reps
    started = time.perf_counter()
    for _ in range(reps):
        replay(env, task, actions, hashes)
    rep = (time.perf_counter() - started) / reps
    return {"rollback_snapshot_ms": round(1000 * snap, 4), "rollback_replay_ms": round(1000 * rep, 3),
            "replayed_steps": len(actions)}


def code(box: Sandbox, reps: int) -> dict:
    env = make("code")
    tasks = env.make_tasks(len(env.problems), 0)
    started, steps = time.perf_counter(), 0
    for _ in range(reps):
        for task in tasks:
            env.reset(task)
            env.step("print(0)\n")  # wrong: judged on the public tests only
            env.step(task.spec["solutions"][0])  # right: public, then hidden tests
            steps += 2
    rate = steps / (time.perf_counter() - started)
    return {"steps_per_s": round(rate, 2), **rollback_cost(env, tasks[0], ["print(0)\n"], reps=5)}


def judge_throughput(reps: int) -> dict:
    problems = load_problems("leafe")
    runs = sum(len(p["public_tests"]) + len(p["private_tests"]) for p in problems) * reps
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boxes = {"bubblewrap": Sandbox(), "rlimits_only": Sandbox(unsafe=True)}
    for name, box in boxes.items():
        started = time.perf_counter()
        for _ in range(reps):
            for p in problems:
                assert judge(p["solutions"][0], p["public_tests"] + p["private_tests"], sandbox=box).passed
        wall = time.perf_counter() - started
        out[name] = {"submissions_per_s": round(reps * len(problems) / wall, 2), "ms_per_test": round(1000 * wall / runs, 1)}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(reps):
            for p in problems:
                (Path(tmp) / "main.py").write_text(p["solutions"][0])
                for t in p["public_tests"] + p["private_tests"]:
                    subprocess.run([boxes["bubblewrap"].interpreter, "-I", "main.py"], input=t["input"], cwd=tmp,
                                   capture_output=True, text=True, timeout=10)
    wall = time.perf_counter() - started
    out["bare_subprocess"] = {"submissions_per_s": round(reps * len(problems) / wall, 2),
                              "ms_per_test": round(1000 * wall / runs, 1)}
    out["tests_per_submission"] = round(runs / reps / len(problems), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/envs.json"))
    args = parser.parse_args()
    report = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "reps": args.reps,
              "sokoban": sokoban(), "code": code(Sandbox(), args.reps), "judge": judge_throughput(args.reps)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
