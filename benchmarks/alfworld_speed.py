"""ALFWorld env speed: reset, steps/s and rollback (replay of a 10-step prefix), without and with the
translation cache, side by side in one run; no model.

    python benchmarks/alfworld_speed.py [--data-dir $ALFWORLD_DATA] [--split valid_unseen] [--games 5]
                                        [--out benchmarks/results/alfworld_speed.json]

With ALFWorld's data (`--data-dir` or $ALFWORLD_DATA holding json_2.1.1/<split>) it times the first
games of the split. Without it, it writes one synthetic game of ALFWorld's format and size (ALFRED
kitchens have some 20-40 receptacles and 30-80 objects; `--receptacles`, `--objects`) into a temp dir
and times that. "before" is textworld alone (every load parses the game's grammar and every load
and reset translates the PDDL problem, as before the cache); "after" caches both
(leafe/envs/alfworld.py), in a fresh cache directory, so its first load of a game is cold. The env has no snapshot, so rollback = `replay` =
reset + re-steps.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import alfworld

import leafe.envs.alfworld as alfworld_env  # importing it registers "alfworld"
from leafe.envs import EnvError, make, observation_hash, replay
from leafe.envs.alfworld import default_data_dir, game_files
from leafe.files import write_json

OBJECT_KINDS = ["Mug", "Bowl", "Plate", "Cup", "Fork", "Spoon", "Knife", "Bread", "Egg", "Potato", "Tomato", "Pan"]


def synthetic_game(data: Path, receptacles: int, objects: int, seed: int = 0) -> None:
    """One pick-and-place game (an apple into the fridge) with many cabinets and objects around."""
    rng = random.Random(seed)
    receps = {f"Fridge_bar_{0}": "Fridge", f"CounterTop_bar_{0}": "CounterTop"}
    receps.update({f"Cabinet_bar_{i}": "Cabinet" for i in range(receptacles - 2)})
    objs = {"Apple_bar_0": "Apple"}
    objs.update({f"{kind}_bar_{i}": kind for i in range(objects - 1) for kind in [rng.choice(OBJECT_KINDS)]})
    lines = ["agent1 - agent", "loc_bar_start - location"]
    lines += [f"{t}Type - otype" for t in sorted(set(objs.values()))]
    lines += [f"{t}Type - rtype" for t in sorted(set(receps.values()))]
    lines += [f"{o} - object" for o in objs] + [f"{r} - receptacle" for r in receps]
    lines += [f"loc_bar_{r} - location" for r in receps]
    init = ["(atLocation agent1 loc_bar_start)"]
    for r, t in receps.items():
        init += [f"(receptacleAtLocation {r} loc_bar_{r})", f"(receptacleType {r} {t}Type)"]
        init += [f"(openable {r})"] if t != "CounterTop" else []
        init += [f"(canContain {t}Type {o}Type)" for o in sorted(set(objs.values()))]
    for o, t in objs.items():
        r = "CounterTop_bar_0" if t == "Apple" else rng.choice(list(receps))
        init += [f"(objectType {o} {t}Type)", f"(pickupable {o})", f"(inReceptacle {o} {r})",
                 f"(objectAtLocation {o} loc_bar_{r})"]
    goal = ("(exists (?r - receptacle) (exists (?o - object) (and (objectType ?o AppleType) "
            "(receptacleType ?r FridgeType) (inReceptacle ?o ?r))))")
    problem = ("(define (problem synthetic)\n(:domain alfred)\n(:objects\n" + "\n".join(lines) + "\n)\n(:init\n"
               + "\n".join(init) + f"\n)\n(:goal\n(and\n{goal}\n)\n)\n)\n")
    path = data / "json_2.1.1" / "valid_seen" / "pick_and_place_simple-Apple-None-Fridge-0" / "trial_0" / "game.tw-pddl"
    path.parent.mkdir(parents=True)
    grammar = Path(alfworld.ALFRED_TWL2_PATH).read_text().replace("UNKNOWN GOAL", "put an apple in fridge")
    path.write_text(json.dumps({"pddl_domain": Path(alfworld.ALFRED_PDDL_PATH).read_text(), "grammar": grammar,
                                "pddl_problem": problem, "solvable": True, "walkthrough": None}))


def timed(f) -> float:
    started = time.perf_counter()
    f()
    return time.perf_counter() - started


def measure(data_dir: str, split: str, games: int, cached: bool, prefix_len: int = 10, reps: int = 3) -> dict:
    """Per game: a new env's reset (load + reset: what each episode of the rollout engine pays) the
    first time the game is played, again in the same process, and in a new process with only the disk
    cache warm; a reset of the game an env has loaded (what a replay pays); random valid steps; and a
    replay of them (reset + re-steps, hash-checked)."""
    alfworld_env.USE_CACHE = cached
    alfworld_env._memory.clear()
    game_files.cache_clear()
    started = time.perf_counter()
    env = make("alfworld", data_dir=data_dir, split=split, valid_action_hints=True)
    tasks = env.make_tasks(games, 0)
    first_load = time.perf_counter() - started  # import textworld + list the split (parses every game file)
    rng = random.Random(0)
    first_s, again_s, disk_s, reset_s, step_s, replay_s, commands = [], [], [], [], [], [], []
    for task in tasks:
        first_s.append(timed(lambda: make("alfworld", data_dir=data_dir, split=split).reset(task)))
        again_s.append(timed(lambda: make("alfworld", data_dir=data_dir, split=split).reset(task)))
        alfworld_env._memory.clear()  # as in a new process (a Ray worker, the next study stage)
        disk_s.append(timed(lambda: make("alfworld", data_dir=data_dir, split=split).reset(task)))
        env.reset(task)  # load it into the timing env (a new game there)
        hashes, actions = [], []
        reset_s.append(timed(lambda: hashes.append(observation_hash(env.reset(task)))))
        admissible = env.admissible_commands
        commands.append(len(admissible))
        for _ in range(prefix_len):  # random valid commands: the expensive kind of step
            action = rng.choice([a for a in admissible if a != "help"])
            results = []
            step_s.append(timed(lambda: results.append(env.step(action))))
            actions.append(action)
            hashes.append(observation_hash(results[0].observation))
            admissible = env.admissible_commands
            if results[0].done:
                break
        for _ in range(reps):
            replay_s.append(timed(lambda: replay(env, task, actions, hashes)))
    median = statistics.median
    return {
        "games": len(tasks), "construct_and_list_s": round(first_load, 3),
        "new_env_reset_first_time_s": round(median(first_s), 3),
        "new_env_reset_same_process_s": round(median(again_s), 3),
        "new_env_reset_new_process_s": round(median(disk_s), 3),
        "reset_same_game_s": round(median(reset_s), 3),
        "step_ms": round(1000 * median(step_s), 1), "steps_per_s": round(1 / median(step_s), 1),
        "replay_prefix_steps": prefix_len, "replay_s": round(median(replay_s), 3),
        "admissible_commands_at_start": round(median(commands)),
    }


def side_by_side(data_dir: str, split: str, games: int) -> dict:
    """The same games without and with the cache, the cache in a fresh temp directory."""
    previous = os.environ.get("LEAFE_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["LEAFE_CACHE"] = cache
        try:
            before = measure(data_dir, split, games, cached=False)
            after = measure(data_dir, split, games, cached=True)
        finally:
            if previous is None:
                os.environ.pop("LEAFE_CACHE")
            else:
                os.environ["LEAFE_CACHE"] = previous
    return {"before (textworld alone)": before, "after (cached grammar and translations)": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="valid_unseen")
    parser.add_argument("--games", type=int, default=5)
    parser.add_argument("--receptacles", type=int, default=30)
    parser.add_argument("--objects", type=int, default=40)
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    data_dir = args.data_dir or str(default_data_dir())
    try:
        game_files(Path(data_dir), args.split)
    except EnvError as exc:
        print(f"no ALFWorld data ({exc})")
        print(f"timing a synthetic game: {args.receptacles} receptacles, {args.objects} objects")
        with tempfile.TemporaryDirectory() as tmp:
            synthetic_game(Path(tmp), args.receptacles, args.objects)
            results = {"synthetic": side_by_side(tmp, "valid_seen", 1)}
    else:
        results = {f"ALFWorld {args.split}": side_by_side(data_dir, args.split, args.games)}
    print(json.dumps(results, indent=2))
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
