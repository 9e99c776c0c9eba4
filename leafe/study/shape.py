"""A model's size and shape from its config.json, without a model library: what the planner
(`leafe.study.budget`) sizes memory from and the study config turns activation checkpointing on by."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leafe.errors import LeafeError
from leafe.files import read_json

GATED_MLP = ("llama", "mistral", "qwen2", "qwen3")  # gate, up and down projections: three matrices


@dataclass(frozen=True)
class ModelShape:
    params: int
    layers: int
    hidden: int
    vocab: int
    kv_heads: int
    heads: int
    head_dim: int
    max_positions: int | None

    def kv_per_token(self, dtype_bytes: int, tp: int = 1) -> float:
        """KV bytes of one token on one GPU: keys and values of every layer; tensor parallelism splits
        the KV heads (a GPU keeps at least one)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes / min(tp, self.kv_heads)


def read_shape(model_dir: Path) -> ModelShape | None:
    """The shape from `model_dir/config.json`; None when there is none (nothing to plan with)."""
    path = model_dir / "config.json"
    if not path.exists():
        return None
    c = read_json(path)

    def need(key: str) -> int:
        if not isinstance(c.get(key), int):
            raise LeafeError(f"{path} has no integer {key!r}: cannot size the model")
        return c[key]

    hidden, layers, heads, inter, vocab = (need(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                            "intermediate_size", "vocab_size"))
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    bias = q + 2 * kv if c.get("attention_bias", c.get("model_type") == "qwen2") else 0  # Qwen2 always has q/k/v biases
    attention = 2 * hidden * q + 2 * hidden * kv + bias
    mlp = (3 if c.get("model_type") in GATED_MLP else 2) * hidden * inter
    embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings", False) else 2)
    params = embeddings + layers * (attention + mlp + 2 * hidden) + hidden
    return ModelShape(params, layers, hidden, vocab, kv_heads, heads, head_dim, c.get("max_position_embeddings"))
