"""GRPO's update step at 1 process, 2 DDP ranks and 2 FSDP2 ranks, side by side on this machine's
CPUs (gloo), with the in-memory weight sync into each rank's hf engine copy after every update.

    python benchmarks/sharded_step.py --model DIR [--updates 4] [--rounds 2] \\
        --out benchmarks/results/sharded_step.json

Each configuration runs tests/workers/grpo_update.py (the fixed batch of the sharding tests: 6
samples, micro-batches of at most 64 tokens, KL to a frozen reference) under the accelerate config a
study writes (`leafe.scale.stage.accelerate_config`); rounds interleave the configurations so a
machine whose speed drifts weighs on all alike. Reported: the median seconds of an update (forward,
backward, optimiser step) and of a sync, over the timed updates of every round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from vllm_overhead import machine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from workers.grpo_update import run_update  # noqa: E402 (the worker the sharding tests run)

CONFIGS = {"1 process": None, "2 ranks, DDP": "ddp", "2 ranks, FSDP2": "fsdp"}


def run(model: str, sharding: str | None, updates: int, work: Path) -> dict:
    try:
        return run_update(Path(model), work / f"{sharding or 'one'}.json", sharding, updates=updates, timeout=3600)
    except RuntimeError as failed:
        raise SystemExit(str(failed).strip().splitlines()[-1]) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--updates", type=int, default=4, help="updates per run (the first is a warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    timings: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    ran: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.rounds):
            for name, sharding in CONFIGS.items():
                result = run(str(Path(args.model).resolve()), sharding, args.updates, Path(work))
                timings[name] += result["timings"]
                ran[name] = result["ran"]
    rows = {}
    for name, found in timings.items():
        rows[name] = {"update_s": statistics.median(t["update_s"] for t in found),
                      "sync_s": statistics.median(t["sync_s"] for t in found),
                      "sync_bytes_to_engine": found[0]["sync_bytes"], "bytes_written": 0, "updates": len(found),
                      "ran": ran[name]}
    report = {"machine": machine(), "model": args.model, "rounds": args.rounds, "updates_per_run": args.updates,
              "results": rows}
    print(f"{'configuration':<16} {'update s':>9} {'sync s':>8}  sharding")
    for name, row in rows.items():
        print(f"{name:<16} {row['update_s']:>9.3f} {row['sync_s']:>8.3f}  {row['ran']['sharding']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
