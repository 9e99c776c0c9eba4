"""The transformers backend: batched sampling with a KV cache that is reused across calls.

An agent's prompt at turn t+1 is its prompt at turn t plus the reply and one observation, and the
branches of a LEAFE tree all start with the same history h_tau. Re-running those shared prefixes
through the model every turn makes the cost of an episode quadratic in its length, and on a CPU the
prefill dominates. So this backend keeps the keys/values of recent sequences (`PrefixCache`, keyed
by hashes of 16-token blocks, as vLLM's prefix caching is) and runs only the new suffix of a prompt.
Identical prompts in one call (n samples of a task, k branches of a node) are prefilled once.

We drive the model ourselves rather than through `model.generate`: it lets us start from cached
keys/values, fork one prefill into many samples, drop finished rows from the batch, and return
log-probs of the exact sampled ids. For a prefill, per-row caches are packed into one left-padded
batch; a row's cached prefix and its new suffix may leave a gap of masked padding between them, which
attention ignores (positions come from the mask, so rotary embeddings see contiguous positions).
Decoding splits the rows into groups of similar length, each its own left-padded batch, since a
decoded token reads every cached position of its batch's width; one sampling call still covers them all.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from leafe.backends.base import Backend, BackendError, BackendStats, Completion, SamplingParams, loading_model
from leafe.chat import generation_stop_ids
from leafe.errors import CorruptFile
from leafe.files import read_json

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


def _buffer_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """A full-attention cache layer over preallocated buffers: appending writes in place.

        transformers' DynamicLayer grows by concatenation, copying the whole cache at every decoded
        token; at batch 64 that copying dominated decoding on CPU.
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


def resolve_model_path(path: str, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """(directory, gguf file name or None); a path to a .gguf file is split into both."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, check_gguf(p).name
    if not p.exists():
        raise BackendError(f"model path {path} does not exist; pass a Hugging Face model directory or a .gguf file")
    if not p.is_dir():
        raise BackendError(f"model path {path} is a file, not a model directory or a .gguf file")
    if gguf_file is None and not (p / "config.json").exists():
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, check_gguf(p / ggufs[0]).name
        raise BackendError(
            f"{path} has no config.json; pass a Hugging Face model directory (or a .gguf file with --gguf-file)"
        )
    if gguf_file is None:
        check_model_dir(p)
    elif (p / gguf_file).is_file():
        check_gguf(p / gguf_file)
    return p, gguf_file


def check_gguf(path: Path) -> Path:
    """`path` when it starts as every GGUF file does, else one line naming it."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CorruptFile(f"{path} is not a GGUF file (it does not start with 'GGUF'); is it the right file?")
    return path


#: The JSON files of a model directory that transformers reads, each one object.
MODEL_JSON = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "chat_template.json", "vocab.json",
              "model.safetensors.index.json")


def check_model_dir(directory: Path) -> None:
    """One line naming the file, before anything loads, for a model directory that cannot load: a JSON
    file of it that is not text or not a JSON object, or a safetensors file cut short (a copy or a
    download that stopped). Reads the JSON files and the safetensors headers, not the weights."""
    for name in MODEL_JSON:
        if (directory / name).is_file():
            read_json(directory / name)
    for path in sorted(directory.glob("*.safetensors")):
        check_safetensors(path)


def check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte range, and
    the data: the file must be as long as its header says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise CorruptFile(f"{path} is not a safetensors file or is truncated ({size} bytes); copy it again")
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            raise CorruptFile(f"{path} is not a safetensors file (its header is not one); copy it again") from None
    if 8 + length + end > size:
        raise CorruptFile(f"{path} is truncated: {size} bytes of the {8 + length + end} its header gives; copy it again")


def pick_device(device: str) -> torch.device:
    """The device a `--device` value names (auto: the GPU when there is one); CUDA asked without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"--device {device} asked for CUDA, but torch sees no GPU; use --device cpu")
    return torch.device(device)


class HFBackend(Backend):
    """Any causal LM that transformers loads: a model directory or a GGUF file (`gguf_file`)."""

    def __init__(
        self,
        model: str,
        *,
        gguf_file: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        prefix_cache_mb: int = 2048,
        prefill_chunk_tokens: int = 16384,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory, gguf = resolve_model_path(model, gguf_file)
        self.device = pick_device(device)
        load_dtype, self._autocast = self._dtypes(dtype)
        kwargs = {"trust_remote_code": trust_remote_code}
        if gguf:
            kwargs["gguf_file"] = gguf
        try:
            with loading_model(model):
                self.tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
                self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=load_dtype, **kwargs)
        except BackendError as exc:
            if "trust_remote_code" in str(exc.__cause__ or exc):  # transformers' own message names the flag
                raise BackendError(
                    f"{model} needs its own code to load; leafe never runs a checkpoint's code unless you "
                    f"pass --trust-remote-code"
                ) from exc
            raise
        self.model.to(self.device).eval()
        # transformers 5.2x renamed the KV cache argument and output `past_key_values` -> `cache` (the
        # old name warns at every call); vLLM's pinned transformers still knows only the old one.
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.name = str(model)
        config = self.model.config
        self.max_context = int(getattr(config, "max_position_embeddings", 0) or 4096)
        self.stop_ids = generation_stop_ids(directory)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.cache = PrefixCache(prefix_cache_mb * 2**20)
        # In-place buffers serve full-attention layers; other layer kinds keep transformers' own cache.
        from transformers.cache_utils import get_layer_types_and_kwargs

        layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        self._buffer_layer = _buffer_layer_class() if set(layer_types) == {"full_attention"} else None
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.group_cost = _group_cost(self.model)  # when decoding rows of unlike lengths apart pays
        self.stats = BackendStats()

    def _dtypes(self, dtype: str) -> tuple[torch.dtype, torch.dtype | None]:
        """(dtype to load weights in, autocast dtype or None)."""
        cuda = self.device.type == "cuda"
        if dtype == "auto":
            dtype = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
        table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
        if dtype not in table:
            raise BackendError(f"unknown --dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        wanted = table[dtype]
        if not cuda and wanted != torch.float32:
            # CPU kernels are fastest and safest with fp32 weights; low precision is applied by autocast.
            return torch.float32, wanted
        return wanted, None

    def close(self) -> None:
        self.cache.clear()

    @torch.no_grad()
    def update_weights(self, weights) -> int:
        """Copy a trainer's new weights into this engine's model, in memory: `weights` yields
        (name, whole tensor) under the model's own parameter names, a layer at a time
        (`leafe.methods.distributed.full_weights`). The prefix cache goes (its keys and values
        belong to the old weights). Returns the bytes copied."""
        params = dict(self.model.named_parameters())
        copied, seen = 0, set()
        for name, tensor in weights:
            if name not in params:
                raise BackendError(f"the trainer sent weight {name}, which this engine's model does not have")
            params[name].copy_(tensor.to(device=params[name].device, dtype=params[name].dtype))
            copied += tensor.numel() * tensor.element_size()
            seen.add(name)
        if missing := set(params) - seen:
            raise BackendError(f"the trainer sent no weights for {len(missing)} parameters (e.g. {min(missing)})")
        self.cache.clear()
        return copied

    # -- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Completion]]:
        if not prompts:
            return []
        self.stats.calls += 1
        unique: dict[tuple[int, ...], int] = {}
        order = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
        for p in unique:
            if not p:
                raise ValueError("cannot generate from an empty prompt")
            if len(p) + sampling.max_new_tokens > self.max_context:
                raise ValueError(
                    f"prompt of {len(p)} tokens + max_new_tokens {sampling.max_new_tokens} exceeds the model's "
                    f"context of {self.max_context} tokens"
                )
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        with self._autocast_ctx():
            rows_kv, rows_logits = self._prefill([np.asarray(p, dtype=np.int64) for p in unique])
            # Row r of the decode batch samples from unique prompt source[r].
            source = [u for u in order for _ in range(sampling.n)]
            outputs = self._decode(list(unique), source, rows_kv, rows_logits, sampling)
        completions = [
            Completion(ids, self.tokenizer.decode(ids, skip_special_tokens=True), reason, lps)
            for ids, reason, lps in outputs
        ]
        self.stats.generated_tokens += sum(len(c.token_ids) for c in completions)
        n = sampling.n
        return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _autocast_ctx(self):
        if self._autocast is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast)

    def _prefill(self, prompts: list[np.ndarray]):
        """Keys/values of every prompt (its cached prefix reused) and the logits after its last token."""
        plans = []
        for ids in prompts:
            hit, entry = self.cache.lookup(ids)
            hit = min(hit, len(ids) - 1)  # at least one token must run to get the next-token logits
            plans.append((ids, hit if entry is not None else 0, entry))
        kvs: list = [None] * len(prompts)
        logits: list = [None] * len(prompts)
        order = sorted(range(len(plans)), key=lambda i: len(plans[i][0]))
        chunk: list[int] = []
        for i in order:
            width = len(plans[i][0])
            if chunk and (len(chunk) + 1) * width > self.prefill_chunk_tokens:
                self._prefill_chunk([plans[j] for j in chunk], chunk, kvs, logits)
                chunk = []
            chunk.append(i)
        if chunk:
            self._prefill_chunk([plans[j] for j in chunk], chunk, kvs, logits)
        for ids, hit, entry in plans:
            if entry is not None and hit == len(entry.ids):
                self.cache.discard(entry)  # the prompt extends it; the longer sequence gets cached instead
        return kvs, logits

    def _prefill_chunk(self, plans, where: list[int], kvs: list, logits: list) -> None:
        cached = [(entry_kv_prefix(entry, hit) if entry is not None and hit > 0 else None) for _, hit, entry in plans]
        hits = [hit if entry is not None else 0 for _, hit, entry in plans]
        suffixes = [ids[h:] for (ids, _, _), h in zip(plans, hits)]
        cache, past_mask = self._pack(cached, hits, room=max(len(x) for x in suffixes))
        width = max(len(s) for s in suffixes)
        input_ids = torch.full((len(plans), width), self.pad_id, dtype=torch.long)
        suffix_mask = torch.zeros((len(plans), width), dtype=torch.long)
        for r, s in enumerate(suffixes):
            input_ids[r, width - len(s) :] = torch.from_numpy(s)
            suffix_mask[r, width - len(s) :] = 1
        mask = torch.cat([past_mask, suffix_mask], dim=1).to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        self.stats.prefill_tokens += sum(len(s) for s in suffixes)
        # Row r holds its cached prefix right-aligned in the first `past` slots, then its suffix
        # right-aligned in the rest: two runs, copied out in one cat (boolean indexing cost 4x more).
        past = past_mask.shape[1]
        layers = getattr(out, self._cache_kw).layers
        for r, i in enumerate(where):
            runs = [(past - hits[r], past), (past + width - len(suffixes[r]), past + width)]
            kvs[i] = [(_runs(layer.keys[r], runs), _runs(layer.values[r], runs)) for layer in layers]
            logits[i] = out.logits[r, -1].float()

    def _pack(self, kvs: list, lengths: list[int], room: int):
        """A cache holding each row's keys/values left-padded to one length (with `room` free slots
        for what comes next), and the matching attention mask."""
        from transformers import DynamicCache

        width = max(lengths) if lengths else 0
        mask = torch.zeros((len(lengths), width), dtype=torch.long)
        for r, n in enumerate(lengths):
            if n:
                mask[r, width - n :] = 1
        cache = DynamicCache(config=self.model.config)
        if width == 0:
            return cache, mask
        template = next(kv for kv in kvs if kv is not None)
        capacity = width + room if self._buffer_layer is not None else width
        layers = []
        for layer, (k0, v0) in enumerate(template):
            # Slots past `width` are written before they are read; padding must hold finite values
            # (masked attention weights are 0, and 0 * NaN would still poison the output).
            keys = k0.new_empty((len(kvs), k0.shape[0], capacity, k0.shape[-1]))
            values = v0.new_empty((len(kvs), v0.shape[0], capacity, v0.shape[-1]))
            for r, kv in enumerate(kvs):
                pad = width - lengths[r]
                keys[r, :, :pad] = 0
                values[r, :, :pad] = 0
                if kv is not None and lengths[r]:
                    keys[r, :, pad:width] = kv[layer][0]
                    values[r, :, pad:width] = kv[layer][1]
            if self._buffer_layer is not None:
                layers.append(self._buffer_layer(keys, values, width))
            else:
                cache.update(keys, values, layer)
        if layers:
            cache.layers = layers
        return cache, mask

    def _decode(self, prompts, source, rows_kv, rows_logits, sp: SamplingParams):
        generator = torch.Generator(device=self.device).manual_seed(sp.seed)
        lengths = [len(prompts[s]) for s in source]
        # The batch mixes episodes at every turn (a finished one's place goes to a new one), so rows of
        # 200 and of 2,000 tokens decode together. Left-padded into one cache, every row would read
        # the longest row's keys/values at every token: decoding is bound by that reading on a CPU.
        # So rows are split by length into groups, each packed and run on its own; sampling still
        # sees the whole batch in one call, in the same order, so the random stream is the same.
        groups = [_Group(rows, *self._pack([rows_kv[source[r]] for r in rows], [lengths[r] for r in rows],
                                           room=sp.max_new_tokens), self.device)
                  for rows in _length_groups(lengths, self.group_cost)]
        logits = torch.stack([rows_logits[s] for s in source])
        stop = torch.tensor(sorted(set(sp.stop_token_ids)) or [-1], device=self.device)
        active = list(range(len(source)))  # decode-batch row -> output index
        live = torch.ones(len(source), dtype=torch.bool, device=self.device)  # rows still generating
        tokens: list[list[int]] = [[] for _ in source]
        lps: list[list[float]] = [[] for _ in source]
        reasons = ["length"] * len(source)
        for step in range(sp.max_new_tokens):
            chosen, chosen_lp = _sample(logits, sp, generator)
            last = step == sp.max_new_tokens - 1
            ended = live & (torch.isin(chosen, stop) | last)
            ids_now = chosen.tolist()
            lps_now = chosen_lp.tolist() if chosen_lp is not None else None
            for r in torch.nonzero(live).flatten().tolist():
                out = active[r]
                tokens[out].append(ids_now[r])
                if lps_now is not None:
                    lps[out].append(lps_now[r])
            ended_rows = torch.nonzero(ended).flatten().tolist()
            if ended_rows:
                where = {r: (g, i) for g in groups for i, r in enumerate(g.rows)}
            for r in ended_rows:
                out = active[r]
                reasons[out] = "stop" if tokens[out][-1] in sp.stop_token_ids else "length"
                # The cache holds the prompt and every sampled id but the last (not yet run).
                ids = np.concatenate([prompts[source[out]], np.asarray(tokens[out][:-1], dtype=np.int64)])
                group, i = where[r]
                self.cache.insert(ids, group.row_kv(i))
            live &= ~ended
            if last or not bool(live.any()):
                break
            # Finished rows ride along (their outputs ignored) until a quarter of the batch has
            # finished: dropping rows copies the whole cache, so it is done in bulk.
            if int((~live).sum()) * 4 >= len(active):
                keep = live.tolist()
                renumber = {old: new for new, old in enumerate(r for r in range(len(active)) if keep[r])}
                groups = [g for g in (g.keep(keep, renumber) for g in groups) if g.rows]
                idx = torch.nonzero(live).flatten()
                chosen, live = chosen[idx], live[idx]
                active = [active[i] for i in idx.tolist()]
            logits = torch.empty((len(active), logits.shape[-1]), device=self.device)
            for g in groups:
                logits[g.index] = g.forward(self, chosen[g.index])
        return [(tokens[i], reasons[i], lps[i] if sp.logprobs else None) for i in range(len(source))]


#: A row-group's fixed cost per decoded token, in the units of its attention cost (rows x cached
#: positions), at least: one forward call of the embedded agent on a CPU costs about what reading ~2k
#: positions' keys and values does. A bigger model's call reads all its weights, which `_group_cost`
#: adds: for a 7B model, hundreds of thousands of positions, so its batch rarely splits.
_GROUP_COST = 2048
_MAX_GROUPS = 8


def _group_cost(model) -> float:
    """A forward call's cost in cached positions: the weights' bytes over one position's keys/values."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    size = next(model.parameters()).element_size()
    return max(_GROUP_COST, weights / (2 * config.num_hidden_layers * kv_heads * head_dim * size))


def _length_groups(lengths: list[int], group_cost: float = _GROUP_COST) -> list[list[int]]:
    """Rows split into at most `_MAX_GROUPS` runs of similar length, minimizing the positions read
    (group size x its longest row, each group also paying `group_cost`); rows keep their order."""
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    n = len(order)
    # Split points on a coarse grid of the sorted rows, so the search stays small for large batches.
    cuts = sorted({round(j * n / 64) for j in range(65)})
    best = {0: (0.0, [])}  # cut -> (cost, groups) for at most k groups, refined k times
    for _ in range(_MAX_GROUPS):
        nxt = dict(best)
        for b in cuts[1:]:
            for a in cuts:
                if a >= b or a not in best:
                    continue
                cost = best[a][0] + group_cost + (b - a) * lengths[order[b - 1]]
                if b not in nxt or cost < nxt[b][0]:
                    nxt[b] = (cost, [*best[a][1], (a, b)])
        best = nxt
    return [sorted(order[a:b]) for a, b in best[n][1]]


class _Group:
    """Decode-batch rows of similar length: their own left-padded cache, mask and positions."""

    def __init__(self, rows: list[int], cache, mask: torch.Tensor, device: torch.device):
        self.rows = rows  # positions in the decode batch, ascending
        self.index = torch.tensor(rows, device=device)
        self.cache = cache
        self.mask = mask.to(device)
        self.positions = self.mask.sum(-1)
        # Rows are left-padded with no gaps: row i's keys/values start at its first unmasked slot.
        self.starts = (self.mask.shape[1] - self.positions).tolist()

    def forward(self, backend: HFBackend, ids: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        out = backend.model(
            input_ids=ids[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            use_cache=True,
            **{backend._cache_kw: self.cache},
        )
        self.positions = self.positions + 1
        return out.logits[:, -1].float()

    def row_kv(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row i's keys/values, copied (so a prefix-cache entry does not pin the group's buffers)."""
        return [(layer.keys[i][:, self.starts[i]:].clone(), layer.values[i][:, self.starts[i]:].clone())
                for layer in self.cache.layers]

    def keep(self, keep: list[bool], renumber: dict[int, int]) -> _Group:
        """This group without the batch's dropped rows, its rows renumbered to the smaller batch."""
        kept = [i for i, r in enumerate(self.rows) if keep[r]]
        if len(kept) < len(self.rows) and kept:
            idx = torch.tensor(kept, device=self.index.device)
            self.cache.reorder_cache(idx)
            self.mask, self.positions = self.mask[idx], self.positions[idx]
            self.starts = [self.starts[i] for i in kept]
        self.rows = [renumber[self.rows[i]] for i in kept]
        self.index = torch.tensor(self.rows, device=self.index.device, dtype=torch.long)
        return self


def _runs(x: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """The positions of `x` ([heads, len, dim]) in the given [start, end) runs, as one new tensor."""
    return torch.cat([x[:, a:b] for a, b in runs if b > a], dim=1)


def entry_kv_prefix(entry: _Entry, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k[:, :length], v[:, :length]) for k, v in entry.kv]


def _sample(logits: torch.Tensor, sp: SamplingParams, generator: torch.Generator):
    """Sampled ids and (when asked) their log-probs under the distribution they were drawn from:
    logits / temperature after top-k and top-p (the plain logits when greedy), as vLLM's
    processed_logprobs mode reports them and GRPO's trainer computes them."""
    drawn_from = logits
    if sp.temperature == 0:
        chosen = logits.argmax(dim=-1)
    else:
        scaled = logits / sp.temperature
        if sp.top_k and sp.top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, sp.top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if sp.top_p < 1.0:
            sorted_logits, sorted_idx = torch.sort(scaled, descending=True, dim=-1)
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            # Keep the smallest set whose mass reaches top_p (the first token always survives).
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs > sp.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
        probs = torch.softmax(scaled, dim=-1)
        chosen = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        drawn_from = scaled
    if not sp.logprobs:
        return chosen, None
    return chosen, torch.log_softmax(drawn_from, dim=-1).gather(-1, chosen[:, None]).squeeze(-1)

