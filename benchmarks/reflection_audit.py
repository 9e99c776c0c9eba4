"""Grade the reflections an exploration made against the solver's first irreversible mistake.

Reads a stage-1 `trees.jsonl` (Sokoban) and, for every reflection, compares the step it named with
the first step of that attempt (so far) after which the level could no longer be solved:

    python benchmarks/reflection_audit.py runs/sokoban-demo/leafe/explore/trees.jsonl

lost / right: the attempt had lost the level and the reflection named that step; lost / none: it had
lost the level and the reflection said nothing was lost; on track / ...: the attempt could still win.
Branches are counted by the same grades, since a branch from a wrong step starts from a lost state.

Then the branches themselves: how often the first move of a branch (a'_tau, sampled with the
experience in context) is the move its experience names ("Instead, go X"), and how often it is an
optimal move from the state at tau, i.e. whether the policy follows an experience at all (the
reference: how often the moves of root episodes are optimal while the level can still be won).
Last, the replies of successful episodes (what stage 2 rehearses) that are not in a form the
bootstrap taught ("Thought: push X from (r,c); at (r,c), go X." or "Thought: go X[ to push the box]."
then "Action: X").
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

_DIRECTION = r"(?:up|down|left|right)"
TAUGHT_REPLY = re.compile(
    rf"Thought: (?:push {_DIRECTION} from \(\d+,\d+\); at \(\d+,\d+\), go {_DIRECTION}\."
    rf"|go {_DIRECTION}(?: to push the box)?\.)\nAction: {_DIRECTION}"
)


def grade(named: int | None, truth: int | None) -> str:
    state = "on track" if truth is None else "lost"
    if named is None:
        return f"{state} / none"
    if truth is None:
        return f"{state} / a step"
    return f"{state} / " + ("right" if named == truth else "earlier" if named < truth else "later")


def main() -> None:
    from leafe.envs.sokoban import SokobanEnv
    from leafe.envs.sokoban.oracle import Expert, first_mistake

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", type=Path)
    parser.add_argument("--max-steps", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None, help="write the counts here as JSON")
    args = parser.parse_args()

    trees = [json.loads(line) for line in args.trees.read_text().splitlines() if line.strip()]
    env = SokobanEnv(max_steps=args.max_steps)
    reflections, branched = collections.Counter(), collections.Counter()
    moves = collections.Counter()  # root moves against branches' first moves (see the docstring)
    for tree in trees:
        seed = int(tree["task_id"].rsplit("-", 1)[1])  # sokoban-<seed>, as make_tasks names them
        expert = Expert.of(env.make_tasks(1, seed)[0], args.max_steps)  # one tree per task
        for node in tree["nodes"]:
            actions = [step["action"] for step in node["episode"]["steps"]]
            for reflection in node["reflections"]:
                mark = grade(reflection["step"], first_mistake(expert, actions[: reflection["after_step"]]))
                reflections[mark] += 1
                if reflection["branched"]:
                    branched[mark] += 1
            if node["outcome"] == "success":
                replies = [step["reply"] for step in node["episode"]["steps"]]
                moves["successful replies"] += len(replies)
                moves["successful replies not as taught"] += sum(not TAUGHT_REPLY.fullmatch(r) for r in replies)
            states = expert.states(actions)
            if node["parent"] is None:  # the reference: how often the policy's own moves are optimal
                for t, action in enumerate(actions):
                    if not expert.lost(states[t], args.max_steps - t):
                        moves["root moves, level not lost"] += 1
                        moves["root moves that are optimal"] += action in expert.optimal(states[t])
            elif len(actions) > node["tau"]:
                tau = node["tau"]
                # The phrase `synthetic.describe_mistake` writes, which the policy was taught to copy.
                named = re.search(rf"Instead, go ({_DIRECTION})\b", node["experience"] or "")
                moves["branches"] += 1
                moves["experience names a move"] += named is not None
                moves["first move is the named one"] += named is not None and actions[tau] == named.group(1)
                moves["first move is optimal"] += actions[tau] in expert.optimal(states[tau])
    total = sum(reflections.values())
    print(f"{total} reflections in {len(trees)} trees ({args.trees})")
    for mark in sorted(reflections):
        print(f"  {mark:20s} {reflections[mark]:5d}  ({reflections[mark] / total:6.1%})  branched {branched[mark]}")
    for what, n in moves.items():
        print(f"  {what:34s} {n:5d}")
    if args.out:
        from leafe.files import write_json

        write_json(args.out, {"trees": str(args.trees), "reflections": dict(reflections), "branched": dict(branched),
                              "branch_moves": dict(moves)})


if __name__ == "__main__":
    main()
