"""GRPO's objective, as pure functions over episodes and tensors (each tested by hand).

Per step: `tasks_per_step` training tasks, G episodes each from the rollout engine (the prompts, step
limits and token accounting of every other method). Reward = success (minus an optional penalty per
invalid action); advantage A = (r - mean) / (std + eps) within a task's group, std unbiased; a group
whose rewards are all equal teaches nothing and leaves the batch entirely (counted as skipped). Each
agent token t of an episode then contributes

    -min(rho_t A, clip(rho_t, 1 - eps_clip, 1 + eps_clip) A) + kl_coef * (exp(q_t) - q_t - 1),
    rho_t = exp(logp_t - logp_old_t),  q_t = logp_ref_t - logp_t,

and the loss is the mean over every agent token of the batch (token-level mean); observation,
prompt and system tokens contribute nothing. Log-probs are recomputed by a full forward pass over
the exact ids the sampler produced (never re-encoded text).

Every log-prob the trainer computes, the policy's, the old policy's and the reference's alike (and
the logged entropy), is of softmax(logits / T) at the sampling temperature T, as in TRL's
GRPOTrainer: the ratio and the KL then compare the distribution that drew the tokens, whichever
engine drew them (vLLM reports its log-probs after temperature too: `logprobs_mode` is
`processed_logprobs` in `leafe.backends.vllm`). Nucleus sampling draws from a truncated distribution
that a plain softmax does not reproduce, so GRPO refuses top_p < 1 (`GRPOSettings.validate`).

When another engine samples, its log-probs weight each token's policy-gradient term by
min(p_trainer / p_sampler, is_cap) (`importance_weights`), sample by sample. A token the engine
reported no log-prob for, and every token of an episode without engine log-probs, keeps weight 1;
the step's record in log.jsonl counts them (`is_missing`, `is_unweighted_tokens`), and the run warns
the first time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from leafe.episode import Episode
from leafe.methods.token_logprobs import logits_only_at, scored_positions, token_logprobs


def episode_reward(episode: Episode, invalid_penalty: float = 0.0) -> float:
    """1 for success, 0 otherwise, minus `invalid_penalty` per step the env flagged invalid."""
    invalid = sum(1 for s in episode.steps if s.info.get("invalid"))
    return float(episode.success) - invalid_penalty * invalid


def group_advantages(rewards: Sequence[float], eps: float = 1e-6) -> list[float] | None:
    """(r - mean) / (std + eps) over one task's group (unbiased std); None when all rewards are equal."""
    if len(rewards) < 2:
        raise ValueError("a group needs at least two episodes")
    values = torch.tensor(rewards, dtype=torch.float64)
    std = values.std(correction=1).item()
    if std < 1e-12:
        return None
    return ((values - values.mean()) / (std + eps)).tolist()


@dataclass
class LossParts:
    loss: torch.Tensor  # this micro-batch's share of the batch loss (already divided by the batch's tokens)
    pg: float  # sums over the micro-batch's agent tokens (for logging)
    kl: float
    clipped: float
    tokens: int


def token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    clip_eps: float,
    kl_coef: float,
    normalizer: float,
    is_weight: torch.Tensor | None = None,
) -> LossParts:
    """The clipped surrogate plus k3 KL over flat agent tokens, summed and divided by `normalizer`.

    All tensors are 1-D over the same agent tokens; `advantages` holds each token's episode advantage.
    `is_weight` (no gradient) multiplies each token's policy-gradient term: the truncated importance
    weight of rollouts sampled by another engine (`importance_weights`); None is 1 everywhere.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    pg = -torch.minimum(unclipped, clipped)
    if is_weight is not None:
        pg = pg * is_weight
    per_token = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_coef > 0:
        q = ref_logp - logp
        kl = torch.exp(q) - q - 1
        per_token = per_token + kl_coef * kl
    was_clipped = ((ratio > 1 + clip_eps) & (advantages > 0)) | ((ratio < 1 - clip_eps) & (advantages < 0))
    return LossParts(
        loss=per_token.sum() / max(normalizer, 1.0),
        pg=pg.detach().sum().item(),
        kl=kl.detach().sum().item(),
        clipped=was_clipped.sum().item(),
        tokens=logp.numel(),
    )


def agent_logprobs(model, sequences: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], pad_id: int,
                   with_entropy: bool = False, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the masked tokens of each sequence under `model`, flattened in sequence order.

    Token j of a sequence is scored by the logits at j - 1, so a mask's first position never counts
    (the first token of an episode is never the agent's). Only those positions reach the output head
    and the fp32 softmax (`leafe.methods.token_logprobs`). With `with_entropy`, also the entropy of
    the full next-token distribution at each of those positions. Both are of softmax(logits /
    `temperature`), the distribution a sampler at that temperature draws from.
    """
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    select = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        select[i, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    select[:, 0] = False
    ids, attention, select = ids.to(device), attention.to(device), select.to(device)
    with logits_only_at(model, scored_positions(select)):
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    return token_logprobs(logits, ids[select], with_entropy, temperature=temperature)


def importance_weights(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """min(p_trainer / p_sampler, cap) per token, without gradient: truncated importance sampling.

    The trainer's log-probs are those of the weights that sampled (before the update); the sampler's
    are what the engine reported for the same ids. The two differ by the engine's numerics (other
    kernels, bf16 paths), which biases the gradient of episodes sampled off the trainer's own
    distribution; capping keeps one unlikely token from dominating the step. NaN in `sampler_logp`
    marks a token without an engine log-prob: its weight is 1 (never a guess at the engine's number).
    """
    weight = torch.exp(trainer_logp.detach() - sampler_logp).clamp(max=cap)
    return torch.where(torch.isnan(sampler_logp), torch.ones_like(weight), weight)


@dataclass
class Sample:
    """One episode as the loss sees it: its exact ids, the agent-token mask, its advantage."""

    ids: list[int]
    mask: list[int]
    advantage: float
    #: The sampling engine's log-prob of each agent token after the first position (the order of
    #: `agent_logprobs`), when another engine than the trainer sampled it; None for a token the
    #: engine reported none for.
    sampler_logp: list[float | None] | None = None


def sampler_logprobs(episode: Episode) -> list[float | None] | None:
    """The engine's log-probs of the episode's agent tokens in sequence order, one per token (None
    where the engine reported none, a whole step's worth for a step without any), or None when no
    step has any (the trainer sampled it itself)."""
    if all(step.logprobs is None for step in episode.steps):
        return None
    out: list[float | None] = []
    for step in episode.steps:
        length = step.action_end - step.action_start
        given = list(step.logprobs or [])[:length]
        out.extend(given + [None] * (length - len(given)))
    return out


def sampler_logp_tensor(batch: Sequence[Sample]) -> torch.Tensor:
    """The engine's log-probs of a micro-batch's agent tokens in `agent_logprobs` order, NaN where
    there is none (a token the engine left out; every token of a sample without engine log-probs)."""
    nan = float("nan")
    values: list[float] = []
    for x in batch:
        tokens = sum(x.mask[1:])
        logps = x.sampler_logp if x.sampler_logp is not None else [None] * tokens
        if len(logps) != tokens:
            raise ValueError(f"a sample has {len(logps)} engine log-probs for its {tokens} agent tokens")
        values.extend(nan if v is None else float(v) for v in logps)
    return torch.tensor(values, dtype=torch.float32)


def group_samples(episodes: Sequence[Episode], invalid_penalty: float = 0.0,
                  adv_eps: float = 1e-6) -> tuple[list[Sample], dict[str, Any]]:
    """Episodes -> loss samples with their group's advantages; zero-variance groups left out, counted."""
    groups: dict[str, list[Episode]] = {}
    for e in episodes:
        groups.setdefault(e.task_id, []).append(e)
    out, skipped, rewards = [], 0, []
    for group in groups.values():
        r = [episode_reward(e, invalid_penalty) for e in group]
        rewards.extend(r)
        adv = group_advantages(r, adv_eps)
        if adv is None:
            skipped += 1
            continue
        for e, a in zip(group, adv):
            mask = e.loss_mask()
            if any(mask):
                out.append(Sample(e.token_ids, mask, a, sampler_logprobs(e)))
    stats = {"groups": len(groups), "skipped_groups": skipped, "skip_rate": skipped / max(len(groups), 1),
             "reward": sum(rewards) / max(len(rewards), 1),
             "success": sum(e.success for e in episodes) / max(len(episodes), 1)}
    return out, stats
