"""Tiny random-weight models of real architectures on the real tokenizers, chat templates and
generation configs in ../shared/data/tokenizers (no weights ship there; its README says where the
files come from). Everything but the weights is what a user's Qwen2.5, Qwen3 or Llama-3.1 brings.

Used by the tests and by benchmarks/gpu_check.py and gpu_check_sharded.py (`cd tests && python -m
probes.real_models OUT` builds all three).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from helpers import SHARED_DATA

TOKENIZERS = SHARED_DATA / "tokenizers"

#: name -> (architecture, model_type, vocab_size of the real config, extra config keys)
ARCHITECTURES = {
    "qwen2.5": ("Qwen2ForCausalLM", "qwen2", 151936, {}),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", 151936, {"head_dim": 64}),
    "llama3.1": ("LlamaForCausalLM", "llama", 128256, {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}),
}


def build_tiny(name: str, out: Path, seed: int = 0) -> Path:
    """A 2-layer model of `name`'s architecture (head_dim 64: vLLM's CPU attention needs it) with
    random weights, saved with the real tokenizer files into `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    architecture, model_type, vocab, extra = ARCHITECTURES[name]
    source = TOKENIZERS / name
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is missing: the real tokenizers live in ../shared/data/tokenizers "
                                f"(or set LEAFE_SHARED_DATA)")
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():  # tokenizer, template and generation_config.json, as the model ships them
        shutil.copyfile(path, out / path.name)
    config = AutoConfig.for_model(
        model_type, architectures=[architecture], vocab_size=vocab, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16384,
        tie_word_embeddings=True, initializer_range=0.2, torch_dtype="float32", **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    # save_pretrained writes its own generation_config.json: keep the model's real one (its stop ids).
    shutil.copyfile(source / "generation_config.json", out / "generation_config.json")
    return out


def build_acting(name: str, out: Path, steps: int = 30, seed: int = 0) -> Path:
    """`build_tiny`, then taught the reply format on Sokoban's first turns ("Thought: ...\nAction: <a
    random direction>"): sampled at T = 1 it then moves, bumps and sometimes answers out of format, so
    GRPO's groups have rewards that differ (a random model's replies are all invalid, every group
    equal and skipped). Trained with leafe's own SFT path, in this process."""
    import random

    from transformers import AutoTokenizer

    from leafe.chat import ChatFormat
    from leafe.envs import make
    from leafe.methods.sft import span_row, train
    from leafe.prompts import SYSTEM_PROMPT, first_message, format_reply
    from leafe.settings import SFTSettings

    build_tiny(name, out, seed)
    tokenizer = AutoTokenizer.from_pretrained(out)
    fmt = ChatFormat(tokenizer)
    env, rng, rows = make("sokoban", max_steps=4), random.Random(seed), []
    for task in env.make_tasks(16, 3):
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": first_message(env.instruction, env.reset(task))}]
        prompt = fmt.initial_ids(messages)
        for _ in range(4):
            reply = fmt.encode(fmt.message_text("assistant", format_reply(
                "move.", rng.choice(["up", "down", "left", "right"])), after_assistant=False))
            rows.append(span_row(prompt + reply, (len(prompt), len(prompt) + len(reply))))
    train(str(out), tokenizer, rows, out, SFTSettings(epochs=1, max_steps=steps, batch_size=8, learning_rate=3e-3,
                                                       warmup_ratio=0.0, seed=seed), precision="no")
    shutil.copyfile(TOKENIZERS / name / "generation_config.json", out / "generation_config.json")  # its stop ids
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for model_name in ARCHITECTURES:
        print(build_tiny(model_name, root / model_name))
