"""Env speed and rollback cost per env, and the code judge's throughput with and without its sandbox.

    python benchmarks/envs.py [--reps 3] [--out benchmarks/results/envs.json] [--only webshop ...]

- steps/s: random (Sokoban, TextWorld), reference/wrong (code) or gold-path (ScienceWorld) actions
  through `Env.step`, no model; ALFWorld on its first 10 valid_unseen games, or a synthetic game of
  ALFRED's size without $ALFWORLD_DATA (alfworld_speed.py);
  WebShop: random valid actions (a product query as the search, then random buttons, buys included)
  on the 1000-product set from $WEBSHOP_DATA (default ../shared/data/webshop), with its reset time;
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
from leafe.envs.base import EnvError, observation_hash, replay
from leafe.envs.code import judge, load_problems
from leafe.envs.code.sandbox import Sandbox


def random_walk(env, tasks, moves: list[str], steps: int) -> float:
    """Steps/s of random `moves`, episode after episode over `tasks` (resets not timed apart)."""
    rng = random.Random(0)
    done, started, i = 0, time.perf_counter(), 0
    while done < steps:
        env.reset(tasks[i % len(tasks)])
        i += 1
        finished = False
        while not finished and done < steps:
            finished = env.step(rng.choice(moves)).done
            done += 1
    return done / (time.perf_counter() - started)


def sokoban(steps: int = 3000) -> dict:
    env = make("sokoban")
    tasks = env.make_tasks(50, 700_000)
    rate = random_walk(env, tasks, ["up", "down", "left", "right"], steps)
    return {"steps_per_s": round(rate, 1), **rollback_cost(env, tasks[0], ["up", "left", "down", "right"] * 3)}


def rollback_cost(env, task, actions: list[str], reps: int = 20) -> dict:
    first = env.reset(task)
    hashes = [observation_hash(first)]
    for a in actions:
        hashes.append(observation_hash(env.step(a).observation))
    out = {}
    if env.supports_snapshot:
        started = time.perf_counter()
        for _ in range(reps):
            env.restore(env.snapshot())
        out["rollback_snapshot_ms"] = round(1000 * (time.perf_counter() - started) / reps, 4)
    started = time.perf_counter()
    for _ in range(reps):
        replay(env, task, actions, hashes)
    out["rollback_replay_ms"] = round(1000 * (time.perf_counter() - started) / reps, 3)
    return {**out, "replayed_steps": len(actions)}


def scienceworld(tasks: int = 6) -> dict:
    env = make("scienceworld", split="dev", max_steps=1000)
    chosen = env.make_tasks(tasks, 0)
    paths = [env.expert_actions(t) for t in chosen]  # the simulator's gold paths (~5 s each to make)
    started, steps = time.perf_counter(), 0
    for task, path in zip(chosen, paths):
        env.reset(task)
        for action in path:
            steps += 1
            if env.step(action).done:
                break
    rate = steps / (time.perf_counter() - started)
    return {"steps_per_s": round(rate, 1), "tasks": [t.task_id for t in chosen],
            **rollback_cost(env, chosen[0], paths[0][:10], reps=5)}


def textworld(steps: int = 2000) -> dict:
    env = make("textworld")
    tasks = env.make_tasks(5, 0)  # generated into the cache on the first run
    moves = ["look", "inventory", "go north", "go south", "go east", "go west", "open door", "take key"]
    rate = random_walk(env, tasks, moves, steps)
    return {"steps_per_s": round(rate, 1), **rollback_cost(env, tasks[0], moves[:5] * 2, reps=10)}


def alfworld() -> dict:
    """The first 10 valid_unseen games when $ALFWORLD_DATA holds them, else one synthetic game of
    ALFRED's size; with leafe's cache, as the env runs."""
    from alfworld_speed import measure, synthetic_game  # beside this script

    from leafe.envs.alfworld import default_data_dir, game_files

    try:
        game_files(default_data_dir(), "valid_unseen")
    except EnvError:
        with tempfile.TemporaryDirectory() as tmp:
            synthetic_game(Path(tmp), receptacles=30, objects=40)
            return {"game": "synthetic, 30 receptacles, 40 objects (no ALFWorld data here)",
                    **measure(tmp, "valid_seen", 1, cached=True)}
    return {"game": "the first 10 valid_unseen games", **measure(str(default_data_dir()), "valid_unseen", 10, cached=True)}


def webshop(steps: int = 2000) -> dict:
    import os

    data = os.environ.get("WEBSHOP_DATA", "../shared/data/webshop")
    started = time.perf_counter()
    env = make("webshop", data_dir=data)  # loads the products, builds goals and the index, loads spaCy
    build_s = time.perf_counter() - started
    tasks = env.make_tasks(50, 0)
    queries = sorted({p.query for p in env.shop.products.values()})
    rng = random.Random(0)
    done, resets, reset_s, i = 0, 0, 0.0, 0
    started = time.perf_counter()
    while done < steps:
        t = time.perf_counter()
        observation = env.reset(tasks[i % len(tasks)])
        reset_s += time.perf_counter() - t
        resets, i, finished = resets + 1, i + 1, False
        while not finished and done < steps:
            valid = observation.rsplit("Valid actions: ", 1)[-1]
            action = f"search[{rng.choice(queries)}]" if valid.startswith("search") else rng.choice(valid.split(", "))
            result = env.step(action)
            observation, finished, done = result.observation, result.done, done + 1
    rate = done / (time.perf_counter() - started)
    # 10 steps: the expert's search, product and option clicks, back to search, twice, then again
    # up to the product (never buying, which would end the episode).
    prefix = (env.expert_actions(tasks[0])[:-1] + ["click[back to search]"]) * 3
    prefix = prefix[:10]
    return {"steps_per_s": round(rate, 1), "reset_ms": round(1000 * reset_s / resets, 4),
            "first_make_s": round(build_s, 2), "episodes": resets, **rollback_cost(env, tasks[0], prefix)}


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
    parser.add_argument("--only", nargs="+", choices=list(BENCHES),
                        help="measure these only and update their entries in --out")
    args = parser.parse_args()
    report = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "reps": args.reps}
    if args.only and args.out.is_file():
        report = {**json.loads(args.out.read_text()), **report}
    for name in args.only or BENCHES:
        report[name] = BENCHES[name](args.reps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


BENCHES = {
    "sokoban": lambda reps: sokoban(), "code": lambda reps: code(Sandbox(), reps), "judge": judge_throughput,
    "scienceworld": lambda reps: scienceworld(), "textworld": lambda reps: textworld(),
    "alfworld": lambda reps: alfworld(), "webshop": lambda reps: webshop(),
}

if __name__ == "__main__":
    sys.exit(main())
