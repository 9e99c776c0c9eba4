"""Run by tests/test_grpo_vllm.py inside .venv-vllm: GRPO's rollout engine on vLLM, with the trainer's
weights synced into it. Prints one JSON line of measurements for the test to check.

- sync: vLLM's log-probs of a fixed sequence against the trainer's, before any update, after an
  update left unsynced, and after `load_weights` (a tied-embedding model: vLLM's reload alone misses it).
- grpo: `leafe train grpo --backend vllm --lora`, two steps, on an untied copy of the model: each
  step's mean |log-prob gap| between the engine's numbers for what it sampled and the trainer's for
  the same ids (the engine gets the adapters merged into the weights after each step).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def trainer_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).tolist()


def gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def sync_check(model_dir: str, work: Path) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from leafe.backends.vllm import VLLMBackend

    engine = VLLMBackend(model_dir, max_model_len=512, kv_cache_gb=1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = [(11 * j) % 400 + 5 for j in range(48)]
    out = {"initial": gap(engine.sequence_logprobs(ids), trainer_logprobs(model, ids))}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):  # a few real optimiser steps, as a trainer takes them
        loss = -trainer_logprobs_graph(model, ids).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    updated = trainer_logprobs(model, ids)
    out["unsynced"] = gap(engine.sequence_logprobs(ids), updated)
    model.save_pretrained(work / "synced")
    engine.load_weights(str(work / "synced"))
    out["synced"] = gap(engine.sequence_logprobs(ids), updated)
    engine.close()
    return out


def trainer_logprobs_graph(model, ids: list[int]):
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def untied_copy(model_dir: str, out: Path) -> str:
    """The same model with its own output head (as 7B+ checkpoints have)."""
    import shutil

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = model.state_dict()
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    model.config.tie_word_embeddings = False
    untied = type(model)(model.config)
    untied.load_state_dict(state)
    untied.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (Path(model_dir) / name).exists():
            shutil.copy(Path(model_dir) / name, out / name)
    return str(out)


def grpo_cli(model_dir: str, out: Path) -> list[dict]:
    """`leafe train grpo --backend vllm --lora`, as a user runs it: the command line's engine options
    reach the engine, and the merged weights are what it samples after each step."""
    import subprocess

    command = [sys.executable, "-m", "leafe", "train", "grpo", "--model", model_dir, "--out", str(out),
               "--backend", "vllm", "--max-model-len", "512", "--kv-cache-gb", "1", "--lora", "--lora-r", "4",
               "--tasks", "4", "--tasks-per-step", "2", "--group-size", "4", "--steps", "2", "--lr", "3e-3",
               "--kl-coef", "0", "--max-new-tokens", "8", "--env-param", "max_steps=3", "--invalid-penalty", "0.1",
               "--save-every", "0"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


if __name__ == "__main__":  # vLLM spawns workers that re-import the main module
    model_dir, work = sys.argv[1], Path(sys.argv[2])
    # two engine starts: the sync of a tied head on its own; then LoRA GRPO from the command line on an
    # untied copy (real 7B checkpoints' kind), where the second step's gap shows the sync in the loop
    result = {"tied": sync_check(model_dir, work / "tied"),
              "grpo": grpo_cli(untied_copy(model_dir, work / "untied-model"), work / "grpo")}
    print(json.dumps(result))
