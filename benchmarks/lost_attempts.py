"""What Sokoban's `end_when_lost` would leave out of an evaluation played to the end.

    leafe eval --model AGENT --out OUT --tasks 20 --samples 16 --task-seed 700000 --env-param max_steps=15 \
        --save-episodes
    python benchmarks/lost_attempts.py OUT/episodes.jsonl

For every failed episode, the first step the env marked as losing (`info.lost`, or a stuck box the
solver proved in a room too big for the distance table): the replies after it are what stopping there
saves, counted in generated tokens and in generated tokens times their context (the positions their
decoding reads).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def losing_step(steps: list[dict]) -> int | None:
    for i, step in enumerate(steps):
        if step["info"].get("lost") or step["info"].get("solvable") is False:
            return i
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("episodes", type=Path, help="episodes.jsonl of `leafe eval --save-episodes`")
    args = parser.parse_args()
    episodes = [json.loads(line) for line in args.episodes.read_text().splitlines() if line.strip()]
    tokens = reads = saved_tokens = saved_reads = known = early = 0
    failed = sum(not e["success"] for e in episodes)
    for episode in episodes:
        steps = episode["steps"]
        sizes = [s["action_end"] - s["action_start"] for s in steps]
        tokens += sum(sizes)
        reads += sum(n * s["context_len"] for n, s in zip(sizes, steps))
        cut = losing_step(steps)
        if episode["success"] or cut is None:
            continue
        known += 1
        early += cut < len(steps) - 1
        saved_tokens += sum(sizes[cut + 1:])
        saved_reads += sum(n * s["context_len"] for n, s in zip(sizes[cut + 1:], steps[cut + 1:]))
    print(f"{len(episodes)} episodes, {failed} failed: {known} marked lost, {early} of them before their last move")
    print(f"stopping there leaves out {saved_tokens / tokens:.1%} of the generated tokens and "
          f"{saved_reads / reads:.1%} of the positions their decoding reads")


if __name__ == "__main__":
    main()
