"""Decoding for the hf backend: rows grouped by length, and the sampling of each next token.

Decoding splits the rows into groups of similar length, each its own left-padded batch, since a
decoded token reads every cached position of its batch's width; one sampling call still covers them
all, so the random stream is the one a single batch would draw.
"""

from __future__ import annotations

import torch

from leafe.backends.base import SamplingParams

#: A row-group's fixed cost per decoded token, in the units of its attention cost (rows x cached
#: positions), at least: one forward call of the embedded agent on a CPU costs about what reading ~2k
#: positions' keys and values does. A bigger model's call reads all its weights, which `forward_cost`
#: adds: for a 7B model, hundreds of thousands of positions, so its batch rarely splits.
_GROUP_COST = 2048
_MAX_GROUPS = 8


def forward_cost(model) -> float:
    """A forward call's cost in cached positions: the weights' bytes over one position's keys/values."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    size = next(model.parameters()).element_size()
    return max(_GROUP_COST, weights / (2 * config.num_hidden_layers * kv_heads * head_dim * size))


def length_groups(lengths: list[int], group_cost: float = _GROUP_COST) -> list[list[int]]:
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


class RowGroup:
    """Decode-batch rows of similar length: their own left-padded cache, mask and positions."""

    def __init__(self, rows: list[int], cache, mask: torch.Tensor, device: torch.device):
        self.rows = rows  # positions in the decode batch, ascending
        self.index = torch.tensor(rows, device=device)
        self.cache = cache
        self.mask = mask.to(device)
        self.positions = self.mask.sum(-1)
        # Rows are left-padded with no gaps: row i's keys/values start at its first unmasked slot.
        self.starts = (self.mask.shape[1] - self.positions).tolist()

    def forward(self, model, cache_kw: str, ids: torch.Tensor) -> torch.Tensor:
        """The next-token logits of these rows after `ids`, `cache_kw` naming the model's KV cache argument."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        out = model(
            input_ids=ids[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            use_cache=True,
            **{cache_kw: self.cache},
        )
        self.positions = self.positions + 1
        return out.logits[:, -1].float()

    def row_kv(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row i's keys/values, copied (so a prefix-cache entry does not pin the group's buffers)."""
        return [(layer.keys[i][:, self.starts[i]:].clone(), layer.values[i][:, self.starts[i]:].clone())
                for layer in self.cache.layers]

    def keep(self, keep: list[bool], renumber: dict[int, int]) -> RowGroup:
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


def sample_next(logits: torch.Tensor, sp: SamplingParams, generator: torch.Generator):
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
