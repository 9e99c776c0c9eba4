"""The hf backend's KV cache: keys/values of recent sequences found by shared prefix, and the
in-place buffers decoding appends to.

An agent's prompt at turn t+1 is its prompt at turn t plus the reply and one observation, and the
branches of a LEAFE tree all start with the same history h_tau. Re-running those shared prefixes
through the model every turn makes the cost of an episode quadratic in its length, and on a CPU the
prefill dominates. So the backend keeps the keys/values of recent sequences (`PrefixCache`, keyed
by hashes of 16-token blocks, as vLLM's prefix caching is) and runs only the new suffix of a prompt.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

_BLOCK = 16  # tokens per hashed block of the prefix cache


@dataclass
class _Entry:
    ids: np.ndarray  # token ids whose keys/values are stored
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [heads, len, head_dim] each
    nbytes: int
    keys: list[bytes]  # block hashes that index this entry


def _block_keys(ids: np.ndarray) -> list[bytes]:
    """Hash of every block-aligned prefix: keys[j] identifies ids[: (j + 1) * _BLOCK]."""
    data = ids.astype(np.int64).tobytes()
    h = hashlib.blake2b(digest_size=16)
    keys = []
    step = _BLOCK * 8
    for j in range(len(ids) // _BLOCK):
        h.update(data[j * step : (j + 1) * step])
        keys.append(h.copy().digest())
    return keys


def buffer_layer_class():
    """The class of the in-place cache layers, made on first use: transformers is imported only when
    a model is."""
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """A full-attention cache layer over preallocated buffers: appending writes in place.

        transformers' DynamicLayer grows by concatenation, copying the whole cache at every decoded
        token; at the batches leafe decodes, that copying dominated decoding on CPU (BENCHMARKS.md,
        "Rollout throughput of the hf backend against `generate`").
        """

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
            super().__init__()
            self.buffers = (keys, values)
            self.length = length
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self._views()

        def _views(self) -> None:
            k, v = self.buffers
            self.keys, self.values = k[:, :, : self.length], v[:, :, : self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            k, v = self.buffers
            end = self.length + key_states.shape[-2]
            if end > k.shape[2]:
                grow = max(end, 2 * k.shape[2]) - k.shape[2]
                k = torch.cat([k, k.new_zeros(*k.shape[:2], grow, k.shape[3])], dim=2)
                v = torch.cat([v, v.new_zeros(*v.shape[:2], grow, v.shape[3])], dim=2)
                self.buffers = (k, v)
            k[:, :, self.length : end] = key_states
            v[:, :, self.length : end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            idx = beam_idx.to(self.device)
            self.buffers = tuple(b.index_select(0, idx) for b in self.buffers)
            self._views()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.reorder_cache(indices)

    return BufferLayer


class PrefixCache:
    """Keys/values of recent sequences, found by longest shared prefix; LRU within a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._index: dict[bytes, int] = {}
        self._next = 0

    def lookup(self, ids: np.ndarray) -> tuple[int, _Entry | None]:
        """The longest cached prefix of `ids` (length, entry); (0, None) when nothing matches."""
        if self.max_bytes <= 0 or not self._entries:
            return 0, None
        keys = _block_keys(ids)
        for j in range(len(keys) - 1, -1, -1):
            key = self._index.get(keys[j])
            if key is None:
                continue
            entry = self._entries[key]
            self._entries.move_to_end(key)
            # Extend past the block boundary to the exact common prefix.
            start = (j + 1) * _BLOCK
            m = min(len(ids), len(entry.ids))
            diff = np.nonzero(ids[start:m] != entry.ids[start:m])[0]
            return (start + int(diff[0]) if len(diff) else m), entry
        return 0, None

    def insert(self, ids: np.ndarray, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if self.max_bytes <= 0 or len(ids) < _BLOCK:
            return
        nbytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv)
        if nbytes > self.max_bytes:
            return
        key = self._next
        self._next += 1
        entry = _Entry(ids, kv, nbytes, _block_keys(ids))
        self._entries[key] = entry
        for block in entry.keys:
            self._index[block] = key
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self.discard(next(iter(self._entries)))

    def discard(self, key_or_entry: int | _Entry) -> None:
        if isinstance(key_or_entry, _Entry):
            key = next((k for k, e in self._entries.items() if e is key_or_entry), None)
            if key is None:
                return
        else:
            key = key_or_entry
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        for block in entry.keys:
            if self._index.get(block) == key:
                del self._index[block]

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)


def entry_kv_prefix(entry: _Entry, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys/values of the first `length` tokens of a cached entry, per layer (views, not copies)."""
    return [(k[:, :length], v[:, :length]) for k, v in entry.kv]
