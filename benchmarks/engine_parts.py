"""Where the hf engine's time goes during one `leafe eval`: prefill, decoding, copies of keys/values.

    python benchmarks/engine_parts.py [--group-cost N] [--prefill-chunk-tokens N] [--out FILE] -- \
        --model AGENT --out OUT --tasks 20 --samples 16 --task-seed 900000 --max-batch 160 --env-param max_steps=15

Everything after `--` is `leafe eval`'s own arguments. The engine's functions are wrapped with
timers in this process (no profiler: its own overhead would blur the per-call costs), and each
decoding forward counts the cached positions its rows read (real ones, and with the group's padding).
`--group-cost` and `--prefill-chunk-tokens` try other values of the engine's two tuning constants;
both leave the episodes as they are.

The parts nest: `prefill` holds `prefill forward`, `prefill copies` (packing cached prefixes) and
`prefill copies out` (each row's keys/values copied out of the batch); `decode copies` is packing the
rows into their length groups, `finished rows out` copying a finished row's keys/values for the
prefix cache, `dropped rows` the bulk copy when finished rows leave the batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

from transformers import LlamaForCausalLM

from leafe.backends.hf import backend as hf
from leafe.backends.hf import decoding

SECONDS: dict[str, float] = defaultdict(float)
COUNTS: dict[str, int] = defaultdict(int)
IN_PREFILL = [False]


def timed(name: str, fn, only_in_prefill: bool | None = None):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if only_in_prefill is None or only_in_prefill == IN_PREFILL[0]:
                SECONDS[name] += time.perf_counter() - started
    return wrapper


def in_prefill(fn):
    def wrapper(*args, **kwargs):
        IN_PREFILL[0] = True
        try:
            return fn(*args, **kwargs)
        finally:
            IN_PREFILL[0] = False
    return wrapper


def counted_forward(forward):
    def wrapper(group, model, cache_kw, ids):
        COUNTS["decode forwards"] += 1
        COUNTS["decoded rows"] += len(group.rows)
        COUNTS["positions read"] += int(group.positions.sum())
        COUNTS["positions read with padding"] += len(group.rows) * group.mask.shape[1]
        return forward(group, model, cache_kw, ids)
    return wrapper


def instrument() -> None:
    model_forward = LlamaForCausalLM.forward
    LlamaForCausalLM.forward = timed("prefill forward", model_forward, only_in_prefill=True)
    hf.HFBackend.generate = timed("generate", hf.HFBackend.generate)
    hf.HFBackend._prefill = timed("prefill", hf.HFBackend._prefill)
    hf.HFBackend._prefill_chunk = in_prefill(hf.HFBackend._prefill_chunk)
    pack = hf.HFBackend._pack
    hf.HFBackend._pack = timed("decode copies", timed("prefill copies", pack, only_in_prefill=True), only_in_prefill=False)
    hf._runs = timed("prefill copies out", hf._runs)
    decoding.RowGroup.forward = counted_forward(timed("decode forward", decoding.RowGroup.forward))
    decoding.RowGroup.row_kv = timed("finished rows out", decoding.RowGroup.row_kv)
    decoding.RowGroup.keep = timed("dropped rows", decoding.RowGroup.keep)
    hf.sample_next = timed("sampling", hf.sample_next)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-cost", type=float, help=f"a length group's cost per call (now {decoding._GROUP_COST:g})")
    parser.add_argument("--prefill-chunk-tokens", type=int, help="rows x width of one prefill call (now 16384)")
    parser.add_argument("--out", help="write the figures here as JSON")
    parser.add_argument("eval_args", nargs=argparse.REMAINDER, help="-- then leafe eval's arguments")
    args = parser.parse_args()
    if args.group_cost is not None:
        decoding._GROUP_COST = args.group_cost
    if args.prefill_chunk_tokens is not None:
        init = hf.HFBackend.__init__
        hf.HFBackend.__init__ = lambda self, *a, **k: init(self, *a, **{**k, "prefill_chunk_tokens": args.prefill_chunk_tokens})
    instrument()
    from leafe.cli.app import main as leafe_main

    sys.argv = ["leafe", "eval", *[a for a in args.eval_args if a != "--"]]
    started = time.perf_counter()
    try:
        leafe_main()
    except SystemExit as done:
        if done.code:
            raise
    figures = {"wall_s": round(time.perf_counter() - started, 2), "seconds": {k: round(v, 2) for k, v in SECONDS.items()},
               "counts": dict(COUNTS)}
    for name, seconds in sorted(SECONDS.items(), key=lambda kv: -kv[1]):
        print(f"{name:>22}: {seconds:7.2f} s")
    for name, n in COUNTS.items():
        print(f"{name:>22}: {n:,}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
