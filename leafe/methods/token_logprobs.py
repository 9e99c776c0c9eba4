"""Log-probs of chosen tokens without the batch's full-vocabulary logits.

A multi-turn episode is mostly prompt and observations: the agent's own tokens (GRPO's loss) and a
row's target turn (SFT's) are a small share of its positions. Two things keep the memory to that
share, whatever wraps the model (DDP, FSDP, ZeRO-3, PEFT): the output head is given only the hidden
states of the scored positions (a forward pre-hook on the head, so the model's own forward, and
every wrapper's hooks around it, still run), and the fp32 log-softmax runs over chunks of those
positions, each recomputed in the backward pass rather than kept, so at most one chunk of fp32
logits exists at a time. The head's output for the scored positions stays in the model's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

from leafe.methods.logprob_chunk import CHUNK


@contextmanager
def logits_only_at(model, positions: torch.Tensor) -> Iterator[None]:
    """While inside, `model(...)`'s logits are those of the True entries of `positions` (B, L) only,
    flattened row-major into (N, vocab)."""
    from accelerate.utils import extract_model_from_parallel

    # the module inside DDP/DeepSpeed wrappers (accelerate's own unwrapping); FSDP2 and PEFT keep the model's
    head = extract_model_from_parallel(model).get_output_embeddings()

    def select(_module, args):
        return (args[0][positions], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def _chunk_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False,
                   chunk: int = CHUNK, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) for each row of `logits` (N, vocab), in fp32, a chunk of rows at a time; with
    `with_entropy`, also each row's entropy (no graph: for logging). With `temperature`, both are of
    softmax(logits / temperature): the distribution a sampler at that temperature draws from."""
    pieces, entropies = [], []
    for start in range(0, logits.shape[0], chunk):
        part, wanted = logits[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled() and part.requires_grad:
            pieces.append(checkpoint(_chunk_logprobs, part, wanted, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(part, wanted, temperature))
        if with_entropy:
            with torch.no_grad():
                logp = torch.log_softmax(part.detach().float() / temperature, dim=-1)
                entropies.append(-(logp.exp() * logp).sum(-1))
    empty = logits.new_zeros(0, dtype=torch.float32)
    logp = torch.cat(pieces) if pieces else empty
    entropy = (torch.cat(entropies) if entropies else empty) if with_entropy else None
    return logp, entropy


def scored_positions(targets_mask: torch.Tensor) -> torch.Tensor:
    """Where the logits that score `targets_mask`'s tokens are: token j is scored by position j - 1."""
    at = torch.zeros_like(targets_mask)
    at[:, :-1] = targets_mask[:, 1:]
    return at
