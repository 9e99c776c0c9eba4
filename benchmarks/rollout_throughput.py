"""Rollout throughput of the hf backend + engine, against raw `model.generate` on the same work.

For each batch size B, B Sokoban episodes run for a fixed number of turns through `RolloutEngine`
(a small random Llama, so replies run to the token limit like long thoughts would). Every prompt
batch the engine sent is recorded and then replayed through `model.generate` with the same
sampling settings: that is what a plain multi-turn loop over transformers costs for the same turns.
The ratio engine/raw of generated tokens per second says what the engine costs (or saves: it reuses
the KV cache of earlier turns, which `generate` recomputes). Also run with prefix reuse turned off,
to separate the engine's overhead from the cache's gain.

    python benchmarks/rollout_throughput.py [--batches 1 16 64] [--turns 6] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import env_texts  # noqa: E402

from leafe.backends.hf import HFBackend  # noqa: E402
from leafe.base_agent.tokenizer import train_tokenizer  # noqa: E402
from leafe.envs import make  # noqa: E402
from leafe.rollout import RolloutEngine  # noqa: E402


def build_model(out: Path, hidden: int, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(env_texts(), vocab_size=1024)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def engine_run(model_dir: Path, batch: int, turns: int, max_new: int, cache_mb: int):
    backend = HFBackend(str(model_dir), device="cpu", prefix_cache_mb=cache_mb)
    recorded = []
    original = backend.generate

    def recording(prompts, sampling):
        recorded.append(([list(p) for p in prompts], sampling))
        return original(prompts, sampling)

    backend.generate = recording
    engine = RolloutEngine(backend, max_new_tokens=max_new, max_batch=batch, temperature=1.0, seed=0)
    env = make("sokoban", max_steps=turns)
    lives = [engine.start(make("sokoban", max_steps=turns), t) for t in env.make_tasks(batch, 2000)]
    start = time.perf_counter()
    episodes = engine.run(lives)
    wall = time.perf_counter() - start
    tokens = sum(e.generated_tokens for e in episodes)
    return {
        "wall_s": wall, "episodes": len(episodes), "generated_tokens": tokens, "tokens_per_s": tokens / wall,
        "episodes_per_s": len(episodes) / wall, "prefill_tokens": backend.stats.prefill_tokens,
        "prompt_tokens": backend.stats.prompt_tokens,
    }, recorded, backend


def raw_generate(backend: HFBackend, recorded) -> dict:
    model, pad = backend.model, backend.pad_id
    tokens, start = 0, time.perf_counter()
    for prompts, sp in recorded:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        torch.manual_seed(sp.seed)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=sp.temperature, top_p=1.0, top_k=0,
                max_new_tokens=sp.max_new_tokens, eos_token_id=list(sp.stop_token_ids), pad_token_id=pad,
            )
        new = out[:, width:]
        for row in new.tolist():
            n = 0
            for t in row:
                n += 1
                if t in sp.stop_token_ids:
                    break
            tokens += n
    wall = time.perf_counter() - start
    return {"wall_s": wall, "generated_tokens": tokens, "tokens_per_s": tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rollout_throughput.json"))
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, params = build_model(Path(tmp), args.hidden, args.layers)
        for batch in args.batches:
            cached, recorded, backend = engine_run(model_dir, batch, args.turns, args.max_new_tokens, 2048)
            raw = raw_generate(backend, recorded)
            uncached, _, _ = engine_run(model_dir, batch, args.turns, args.max_new_tokens, 0)
            row = {"batch": batch, "engine": cached, "engine_no_prefix_cache": uncached, "raw_generate": raw,
                   "ratio": cached["tokens_per_s"] / raw["tokens_per_s"],
                   "ratio_no_prefix_cache": uncached["tokens_per_s"] / raw["tokens_per_s"]}
            rows.append(row)
            print(
                f"B={batch:3d}  engine {cached['tokens_per_s']:7.0f} tok/s {cached['episodes_per_s']:6.2f} ep/s | "
                f"no cache {uncached['tokens_per_s']:7.0f} tok/s | raw generate {raw['tokens_per_s']:7.0f} tok/s | "
                f"ratio {row['ratio']:.2f} (no cache {row['ratio_no_prefix_cache']:.2f})",
                flush=True,
            )
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}",
        "torch": torch.__version__, "model_params": params, "turns": args.turns,
        "max_new_tokens": args.max_new_tokens, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"model {params / 1e6:.1f}M params -> {args.out}")


if __name__ == "__main__":
    main()
