"""The transformers backend: batched sampling with a KV cache that is reused across calls.

`backend` holds `HFBackend`: it prefills prompts from their cached prefixes and decodes them,
driving the model itself. `cache` holds the prefix cache and the in-place KV buffers, `decoding`
the grouping of rows by length and the sampling of each next token, and `loading` what is checked
and resolved before a model loads (a model directory or a GGUF file, the device).
"""

from leafe.backends.hf.backend import HFBackend
from leafe.backends.hf.cache import PrefixCache
from leafe.backends.hf.loading import (
    MODEL_JSON,
    check_gguf,
    check_model_dir,
    check_safetensors,
    pick_device,
    resolve_model_path,
)

__all__ = ["MODEL_JSON", "HFBackend", "PrefixCache", "check_gguf", "check_model_dir", "check_safetensors",
           "pick_device", "resolve_model_path"]
