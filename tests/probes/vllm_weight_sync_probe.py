"""Run by tests/test_weight_sync_vllm.py inside .venv-vllm: `VLLMBackend.update_weights` puts a
trainer's weights into the engine in memory (no file), on a tied head (vLLM's reload alone misses it),
an untied one, and Qwen2.5's architecture (biased q/k/v, tied head, real tokenizer). Prints one JSON
line of log-prob gaps for the test to check.

Every weight is perturbed before a sync, so a weight left stale (one the update skipped, the CPU
worker's packed copy of a layer, the tied head) keeps the engine's log-probs off by the
perturbation's size: reported as "unsynced".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def perturb(model, seed: int, scale: float = 0.05) -> None:
    """Move every weight of `model` (HF, in place) by noise of `scale` times its own spread."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            spread = param.float().std().item() if param.numel() > 1 else 1.0
            param.add_(torch.randn(param.shape, generator=generator) * scale * max(spread, 1e-2))


def check(model_dir: str, work: Path, *, chunked: bool, fallback: bool, shared_memory: bool = True) -> dict:
    """One engine: gaps to the HF model before, after an unsynced perturbation, after
    `update_weights`, again after a second perturbation and sync (chunked: a call per tensor, so
    layers arrive over several calls and the staging segment is reused under the first ones;
    `shared_memory` False: the bytes inside the calls), after a sync missing one weight (an error),
    and after the file path `load_weights` (the fallback)."""
    import torch
    from transformers import AutoModelForCausalLM

    from leafe.backends.base import BackendError, SamplingParams
    from leafe.backends.vllm import VLLMBackend
    from probes.vllm_grpo_probe import gap, trainer_logprobs

    engine = VLLMBackend(model_dir, max_model_len=512, kv_cache_gb=1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = min(model.config.vocab_size, 400)
    ids = [(11 * j) % (vocab - 5) + 5 for j in range(48)]
    out = {"initial": gap(engine.sequence_logprobs(ids), trainer_logprobs(model, ids))}
    perturb(model, 1)
    target = trainer_logprobs(model, ids)
    out["unsynced"] = gap(engine.sequence_logprobs(ids), target)
    out["bytes"] = engine.update_weights(model.named_parameters())
    out["expected_bytes"] = sum(p.numel() * 4 for p in model.parameters())  # fp32 engine, tied head once
    out["synced"] = gap(engine.sequence_logprobs(ids), target)
    out["generates"] = len(engine.generate([ids[:8]], SamplingParams(temperature=0.0, max_new_tokens=4))[0][0].token_ids)

    perturb(model, 2)
    target = trainer_logprobs(model, ids)
    out["unsynced_2"] = gap(engine.sequence_logprobs(ids), target)
    engine.update_weights(model.named_parameters(), shared_memory=shared_memory,
                          **({"chunk_bytes": 1} if chunked else {}))
    out["synced_2"] = gap(engine.sequence_logprobs(ids), target)

    # a sync that leaves a weight out says so, and the engine keeps working (the rest is synced)
    skipped = "model.layers.1.mlp.down_proj.weight"
    perturb(model, 3)
    try:
        engine.update_weights((n, p) for n, p in model.named_parameters() if n != skipped)
        out["missing_error"] = ""
    except BackendError as exc:
        out["missing_error"] = str(exc)
    engine.update_weights(model.named_parameters())
    out["synced_after_error"] = gap(engine.sequence_logprobs(ids), trainer_logprobs(model, ids))

    if fallback:  # the file path still works after in-memory updates
        perturb(model, 4)
        model.save_pretrained(work / "fallback")
        engine.load_weights(str(work / "fallback"))
        out["file_synced"] = gap(engine.sequence_logprobs(ids), trainer_logprobs(model, ids))
    engine.close()
    return out


def probe(model_dir: str, work: Path) -> dict:
    from probes.real_models import TOKENIZERS, build_tiny
    from probes.vllm_grpo_probe import untied_copy

    result = {"tied": check(model_dir, work / "tied", chunked=False, fallback=True),
              "untied": check(untied_copy(model_dir, work / "untied-model"), work / "untied", chunked=True,
                              fallback=False, shared_memory=False)}
    if (TOKENIZERS / "qwen2.5").is_dir():
        qwen = build_tiny("qwen2.5", work / "qwen2.5")
        result["qwen2.5"] = check(str(qwen), work / "qwen", chunked=True, fallback=False)
    return result


if __name__ == "__main__":  # vLLM spawns workers that re-import the main module
    print(json.dumps(probe(sys.argv[1], Path(sys.argv[2]))))
