"""The least time any exact engine could take to generate an evaluation's episodes on this machine.

    leafe eval --model AGENT --out OUT --tasks 20 --samples 16 --task-seed 900000 --max-batch 160 \
        --env-param max_steps=15 --save-episodes
    python benchmarks/engine_floor.py OUT --model AGENT [--threads 2] [--speed ENGINE_SPEED.json]
        [--wall NAME=SECONDS ...] [--out FILE]

An exact engine gives these very episodes for these seeds, so whatever it does, it must:
1. run every prompt token through the model once (the prefill): its linear layers, and its attention
   over every position before it (a prefix that several episodes share, such as a level's first
   prompt, once; after the first turn only what follows the previous reply);
2. for every generated token, read the keys and values of every position before it (decoding; on a
   CPU this reading, not the arithmetic, is the cost) and run the token through the linear layers.

The episodes give the tokens and their positions. The machine gives two rates, measured here at
`--threads`: how fast it reads memory (a sum over 1 GiB of fp32) and how fast it multiplies fp32
matrices (2048 x 2048). The floor is bytes read / read rate + flops / matmul rate: every part at the
machine's peak, and nothing else (Python, sampling, the env, copies, padding) costing anything. A real
engine is slower. `--speed` reads the sides of a `benchmarks/engine_speed.py` result on the same
workload (their median walls), `--wall` adds a measured run by hand; for each, how far it is from the
floor, i.e. the largest speed-up any exact engine could still give it on this machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from vllm_overhead import machine  # the processor's name: machines of one kind differ (AMD, Intel)


def shapes(model_dir: Path) -> dict:
    """What the counts need from the model's config: bytes of one position's keys and values, and the
    flops of one token through the linear layers (2 per weight; the output head counted separately)."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    mlp, vocab = config["intermediate_size"], config["vocab_size"]
    per_layer = hidden * head_dim * (heads * 2 + kv_heads * 2) + 3 * hidden * mlp  # q, o, k, v; gate, up, down
    return {
        "kv_bytes_per_position": layers * 2 * kv_heads * head_dim * 4,  # fp32 keys and values
        "attention_flops_per_position": layers * 4 * heads * head_dim,  # q.k and p.v, per position attended
        "linear_flops": 2 * layers * per_layer,
        "head_flops": 2 * hidden * vocab,
    }


def counts(episodes: list[dict], shape: dict) -> dict:
    """Runs, positions read and flops that the episodes require of any exact engine.

    A run is one position of one episode's token ids going through the model. Episodes that share a
    prefix (the samples of a level share their first prompt, sometimes more) need its runs once, so
    runs are counted once per distinct prefix. A run inside a reply (every reply token but the last,
    which the next prompt's prefill runs) is a decoding run: it reads the keys and values of every
    position up to it. Any other run is a prefill run: its attention over the same positions is
    arithmetic on keys that many queries share.
    """
    seen: set[int] = set()
    prefill_runs = prefill_positions = decode_runs = decode_positions = generated = 0
    for episode in episodes:
        ids = episode["token_ids"]
        decoding = bytearray(len(ids))
        last = 0  # positions 0..last-1 are run: all before the last reply's last token
        for step in episode["steps"]:
            start, end = step["action_start"], step["action_end"]
            generated += end - start
            decoding[start:end - 1] = b"\x01" * max(0, end - 1 - start)
            last = end - 1
        key = 0
        for p in range(last):
            key = hash((key, ids[p]))
            if key in seen:
                continue
            seen.add(key)
            if decoding[p]:
                decode_runs += 1
                decode_positions += p + 1
            else:
                prefill_runs += 1
                prefill_positions += p + 1
    logits = decode_runs + sum(len(e["steps"]) for e in episodes)  # every decoding run, every prompt's last run
    return {
        "episodes": len(episodes),
        "generated_tokens": generated,
        "prefill_runs": prefill_runs,
        "decode_runs": decode_runs,
        "decode_kv_bytes": decode_positions * shape["kv_bytes_per_position"],
        "flops": (prefill_runs + decode_runs) * shape["linear_flops"]
        + prefill_positions * shape["attention_flops_per_position"]
        + logits * shape["head_flops"],
    }


def machine_rates(threads: int) -> dict:
    """Read rate (GB/s, sum over 1 GiB of fp32) and fp32 matmul rate (GFLOP/s), best of 5 each."""
    torch.set_num_threads(threads)
    x = torch.randn(256 * 2**20)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    return {"read_gb_s": round(x.numel() * 4 / best(x.sum) / 1e9, 1),
            "matmul_gflop_s": round(2 * 2048**3 / best(lambda: a @ b) / 1e9, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the OUT of a `leafe eval --save-episodes`")
    parser.add_argument("--model", type=Path, required=True, help="the model directory the run evaluated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed", type=Path, help="an engine_speed.py result of the same workload")
    parser.add_argument("--wall", action="append", default=[], metavar="NAME=SECONDS",
                        help="a measured run of the same episodes (e.g. d5882ff=143.4)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    walls = []  # read before the machine is measured, so a bad --wall fails at once
    for item in args.wall:
        name, _, seconds = item.partition("=")
        try:
            walls.append((name, float(seconds)))
        except ValueError:
            raise SystemExit(f"--wall takes NAME=SECONDS, e.g. d5882ff=143.4 (got {item!r})") from None
    episodes = [json.loads(line) for line in (args.run / "episodes.jsonl").read_text().splitlines() if line.strip()]
    need = counts(episodes, shapes(args.model))
    rates = machine_rates(args.threads)
    read_s = need["decode_kv_bytes"] / (rates["read_gb_s"] * 1e9)
    compute_s = need["flops"] / (rates["matmul_gflop_s"] * 1e9)
    floor = read_s + compute_s
    result = {"machine": machine(), "threads": args.threads, **rates, **need,
              "floor_s": {"decode_reads": round(read_s, 1), "arithmetic": round(compute_s, 1), "total": round(floor, 1)},
              "floor_tokens_per_s": round(need["generated_tokens"] / floor, 1), "runs": {}}
    print(f"{machine()}, {args.threads} threads: reads {rates['read_gb_s']} GB/s, fp32 matmul {rates['matmul_gflop_s']} GFLOP/s")
    print(f"{need['episodes']} episodes: {need['generated_tokens']} generated tokens, {need['prefill_runs']} prefill and {need['decode_runs']} decoding runs; "
          f"decoding reads {need['decode_kv_bytes'] / 1e9:.0f} GB of keys/values, {need['flops'] / 1e12:.2f} TFLOP in all")
    print(f"floor: {read_s:.1f} s reading + {compute_s:.1f} s arithmetic = {floor:.1f} s "
          f"({result['floor_tokens_per_s']} generated tok/s)")
    if args.speed:
        speed = json.loads(args.speed.read_text())
        for name, side in speed["sides"].items():
            if side["generated_tokens"] != need["generated_tokens"]:
                raise SystemExit(f"{args.speed}: side {name!r} generated {side['generated_tokens']} tokens, these "
                                 f"episodes {need['generated_tokens']}: not the same workload")
            walls.append((name, side["wall_s"]))
    for name, wall in walls:
        result["runs"][name] = {"wall_s": round(wall, 1), "tokens_per_s": round(need["generated_tokens"] / wall, 1),
                                "most_speedup_left": round(wall / floor, 2)}
        print(f"{name}: {wall:.1f} s, {need['generated_tokens'] / wall:.0f} tok/s, {wall / floor:.2f}x the floor")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
