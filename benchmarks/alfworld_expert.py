"""ALFWorld's expert on every game of the evaluation splits: does its walkthrough win, in how many steps?

    python benchmarks/alfworld_expert.py [--data-dir $ALFWORLD_DATA] [--splits valid_seen valid_unseen]
                                         [--out benchmarks/results/alfworld_expert.json] [--filter-only]

The expert is what `AlfWorldEnv.expert_actions` gives (the game's stored walkthrough, ALFWorld's
hand-coded expert; fast-downward's plan when a game has none), i.e. the demonstrations Early
Experience imitates. Each game is played by the env as an agent would play it, with no step limit, so
a walkthrough longer than the env's default `max_steps` (50) is counted, and flagged, rather than cut
off. A failure is explained by its first command the game did not accept ("Nothing happens.") or,
when every command was accepted, by the last observation. It also counts each split's game files
before and after the env's filter (movable receptacles, sliced objects, games marked unsolvable,
as ALFWorld's `AlfredTWEnv` skips them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

from leafe.envs import make
from leafe.envs.alfworld import SPLITS, default_data_dir, game_files  # importing it registers "alfworld"
from leafe.files import write_json

DEFAULT_MAX_STEPS = 50  # AlfWorldEnv's default step limit (ReAct's)


def filter_counts(data_dir: Path, split: str) -> dict:
    """Game files of a split before and after the env's filter, and why each left-out one left."""
    found = sorted((data_dir / "json_2.1.1" / split).glob("**/game.tw-pddl"))
    kept = set(game_files(data_dir, split))
    reasons: Counter[str] = Counter()
    no_solvable_key = 0
    for path in found:
        relative = path.relative_to(data_dir).as_posix()
        game = json.loads(path.read_text())
        no_solvable_key += "solvable" not in game
        if relative in kept:
            continue
        reasons["movable" if "movable" in relative else "Sliced" if "Sliced" in relative else "unsolvable"] += 1
    return {"game_files": len(found), "playable": len(kept), "left_out": dict(reasons),
            "without_solvable_key": no_solvable_key}


def play_expert(env, task) -> dict:
    """One game played with the expert's commands; the record says whether and how it ended."""
    started = time.perf_counter()
    actions = env.expert_actions(task)
    source = "walkthrough" if json.loads((env.data_dir / task.spec["game"]).read_text()).get("walkthrough") else "planner"
    observation = env.reset(task)
    record = {"task_id": task.task_id, "game": task.spec["game"], "task_type": task.spec["task_type"],
              "expert": source, "expert_steps": len(actions or [])}
    rejected = None
    success = False
    for i, action in enumerate(actions or []):
        result = env.step(action)
        observation = result.observation
        if result.info["invalid"] and rejected is None:
            rejected = {"step": i, "action": action, "observation": observation}
        if result.done:
            success = result.success
            record["ended_at_step"] = i + 1
            break
    record.update(success=success, within_default_max_steps=success and len(actions) <= DEFAULT_MAX_STEPS,
                  wall_s=round(time.perf_counter() - started, 3))
    if not success:
        record["first_rejected"] = rejected
        record["last_observation"] = observation
    return record


def run_split(data_dir: Path, split: str) -> dict:
    env = make("alfworld", data_dir=str(data_dir), split=split, max_steps=1000)
    tasks = env.make_tasks(len(game_files(data_dir, split)), 0)
    games = []
    for n, task in enumerate(tasks):
        games.append(play_expert(env, task))
        if (n + 1) % 20 == 0:
            print(f"  {split}: {n + 1}/{len(tasks)} games, {sum(g['success'] for g in games)} won", flush=True)
    by_type: dict[str, list[int]] = {}
    for g in games:
        by_type.setdefault(g["task_type"], [0, 0])
        by_type[g["task_type"]][0] += g["success"]
        by_type[g["task_type"]][1] += 1
    return {
        "filter": filter_counts(data_dir, split),
        "games": len(games),
        "won": sum(g["success"] for g in games),
        "won_within_default_max_steps": sum(g["within_default_max_steps"] for g in games),
        "expert_sources": dict(Counter(g["expert"] for g in games)),
        "expert_steps_median": statistics.median(g["expert_steps"] for g in games),
        "expert_steps_max": max(g["expert_steps"] for g in games),
        "by_task_type": {t: {"won": w, "games": n} for t, (w, n) in sorted(by_type.items())},
        "seconds_per_game_median": statistics.median(g["wall_s"] for g in games),
        "failures": [g for g in games if not g["success"]],
        "per_game": [{k: g[k] for k in ("task_id", "game", "success", "expert_steps", "wall_s")} for g in games],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="the folder holding json_2.1.1 (default: $ALFWORLD_DATA)")
    parser.add_argument("--splits", nargs="+", default=["valid_seen", "valid_unseen"])
    parser.add_argument("--out", default="benchmarks/results/alfworld_expert.json")
    parser.add_argument("--filter-only", action="store_true",
                        help="only print every split's game counts before and after the filter (seconds)")
    args = parser.parse_args()
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if args.filter_only:
        found = [s for s in SPLITS if (data_dir / "json_2.1.1" / s).is_dir()]
        print(json.dumps({split: filter_counts(data_dir, split) for split in found}, indent=2))
        return
    started = time.perf_counter()
    results = {"data_dir": str(data_dir), "splits": {}}
    for split in args.splits:
        print(f"{split}:", flush=True)
        results["splits"][split] = run_split(data_dir, split)
        s = results["splits"][split]
        print(f"{split}: expert won {s['won']}/{s['games']} ({s['won_within_default_max_steps']} within "
              f"{DEFAULT_MAX_STEPS} steps); filter {s['filter']}", flush=True)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(args.out, results)
    print(f"wrote {args.out} ({results['wall_s']} s)")


if __name__ == "__main__":
    main()
