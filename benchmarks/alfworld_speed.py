"""ALFWorld env speed: steps/s and rollback cost (replay of a 10-step prefix), no model.

    python benchmarks/alfworld_speed.py [--data-dir $ALFWORLD_DATA] [--receptacles 30] [--objects 40]

With ALFWorld's data (`--data-dir` or $ALFWORLD_DATA holding json_2.1.1/valid_seen) it times the
first games of valid_seen. Without it, it writes one synthetic game of ALFWorld's format and size
(ALFRED kitchens have some 20-40 receptacles and 30-80 objects) into a temp dir and times that.
The env has no snapshot (see leafe/envs/alfworld.py), so rollback = `replay` = reset + re-steps.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import alfworld

from leafe.envs import EnvError, make, observation_hash, replay
from leafe.envs.alfworld import default_data_dir, game_files  # importing it registers "alfworld"

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


def measure(data_dir: str, games: int, prefix_len: int = 10, reps: int = 3) -> dict:
    started = time.perf_counter()
    env = make("alfworld", data_dir=data_dir, valid_action_hints=True)
    tasks = env.make_tasks(games, 0)
    first_load = time.perf_counter() - started  # import textworld + list the split (parses every game file)
    env.reset(tasks[0])
    start_commands = len(env.admissible_commands)
    rng = random.Random(0)
    step_s, reset_s, replay_s, load_s = [], [], [], []
    for task in tasks:
        t = time.perf_counter()
        fresh = make("alfworld", data_dir=data_dir)
        fresh.reset(task)  # includes loading (grammar parse) the game file
        load_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        hashes, actions = [observation_hash(env.reset(task))], []
        reset_s.append(time.perf_counter() - t)
        admissible = env.admissible_commands
        for _ in range(prefix_len):  # random valid commands: the expensive kind of step
            action = rng.choice([a for a in admissible if a != "help"])
            t = time.perf_counter()
            result = env.step(action)
            step_s.append(time.perf_counter() - t)
            actions.append(action)
            hashes.append(observation_hash(result.observation))
            admissible = env.admissible_commands
            if result.done:
                break
        for _ in range(reps):
            t = time.perf_counter()
            replay(env, task, actions, hashes)
            replay_s.append(time.perf_counter() - t)
    return {
        "games": len(tasks), "construct_and_list_s": round(first_load, 3),
        "load_and_first_reset_s": round(statistics.median(load_s), 3),
        "reset_s": round(statistics.median(reset_s), 3),
        "step_ms": round(1000 * statistics.median(step_s), 1), "steps_per_s": round(1 / statistics.median(step_s), 1),
        "replay_prefix_steps": prefix_len, "replay_s": round(statistics.median(replay_s), 3),
        "admissible_commands_at_start": start_commands,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--games", type=int, default=5)
    parser.add_argument("--receptacles", type=int, default=30)
    parser.add_argument("--objects", type=int, default=40)
    args = parser.parse_args()
    data_dir = args.data_dir or str(default_data_dir())
    try:
        game_files(Path(data_dir), "valid_seen")
    except EnvError as exc:
        print(f"no ALFWorld data ({exc})")
        print(f"timing a synthetic game: {args.receptacles} receptacles, {args.objects} objects")
        with tempfile.TemporaryDirectory() as tmp:
            synthetic_game(Path(tmp), args.receptacles, args.objects)
            print("synthetic:", measure(tmp, 1))
        return
    print("ALFWorld data:", measure(data_dir, args.games))


if __name__ == "__main__":
    main()
