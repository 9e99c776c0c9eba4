"""`HFBackend`: any causal LM that transformers loads, sampled with a reused KV cache.

We drive the model ourselves rather than through `model.generate`: it lets us start from cached
keys/values, fork one prefill into many samples, drop finished rows from the batch, and return
log-probs of the exact sampled ids. For a prefill, per-row caches are packed into one left-padded
batch; a row's cached prefix and its new suffix may leave a gap of masked padding between them, which
attention ignores (positions come from the mask, so rotary embeddings see contiguous positions).
Identical prompts in one call (n samples of a task, k branches of a node) are prefilled once.
Decoding runs the rows in groups of similar length (`leafe.backends.hf.decoding`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch

from leafe.backends.base import Backend, BackendError, BackendStats, Completion, SamplingParams, loading_model
from leafe.backends.hf.cache import PrefixCache, buffer_layer_class, entry_kv_prefix
from leafe.backends.hf.decoding import RowGroup, forward_cost, length_groups, sample_next
from leafe.backends.hf.loading import pick_device, resolve_model_path
from leafe.chat import generation_stop_ids


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
        self._buffer_layer = buffer_layer_class() if set(layer_types) == {"full_attention"} else None
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.group_cost = forward_cost(self.model)  # when decoding rows of unlike lengths apart pays
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
        self.check_prompts(prompts, sampling)
        self.stats.calls += 1
        unique: dict[tuple[int, ...], int] = {}
        order = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
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
        # right-aligned in the rest: two runs, copied out in one cat (boolean indexing gathers element by
        # element, several times slower).
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
        groups = [RowGroup(rows, *self._pack([rows_kv[source[r]] for r in rows], [lengths[r] for r in rows],
                                           room=sp.max_new_tokens), self.device)
                  for rows in length_groups(lengths, self.group_cost)]
        logits = torch.stack([rows_logits[s] for s in source])
        stop = torch.tensor(sorted(set(sp.stop_token_ids)) or [-1], device=self.device)
        active = list(range(len(source)))  # decode-batch row -> output index
        live = torch.ones(len(source), dtype=torch.bool, device=self.device)  # rows still generating
        tokens: list[list[int]] = [[] for _ in source]
        lps: list[list[float]] = [[] for _ in source]
        reasons = ["length"] * len(source)
        for step in range(sp.max_new_tokens):
            chosen, chosen_lp = sample_next(logits, sp, generator)
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
                logits[g.index] = g.forward(self.model, self._cache_kw, chosen[g.index])
        return [(tokens[i], reasons[i], lps[i] if sp.logprobs else None) for i in range(len(source))]


def _runs(x: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """The positions of `x` ([heads, len, dim]) in the given [start, end) runs, as one new tensor."""
    return torch.cat([x[:, a:b] for a, b in runs if b > a], dim=1)
