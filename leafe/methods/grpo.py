"""Multi-turn GRPO, the outcome-reward baseline: G episodes per task, group-normalised advantages,
a clipped policy-gradient loss on the agent's own tokens, and a k3 KL penalty to the starting model.

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

Why not TRL's GRPOTrainer: its `rollout_func`/`env_mask` path (experimental in TRL 1.16) could carry
our multi-turn episodes, but zero-variance groups stay in its batch (their tokens still count in the
loss normaliser and still carry the KL term), and its sampling without vLLM is its own `generate`
call, not our backend with its prefix cache. So this is a compact trainer on accelerate: sampling
goes through `rollout.py` with the backend holding the very weights being trained (its KV cache is
dropped after each update), and the loss, logging and checkpoints live here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import shutil
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from leafe.backends.base import loading_model
from leafe.envs import EnvMaker, make
from leafe.envs.base import Task
from leafe.episode import Episode
from leafe.errors import LeafeError
from leafe.files import append_jsonl, expect, process_rank, read_json, read_jsonl, write_json, write_jsonl, writing
from leafe.fingerprint import resume_fingerprint
from leafe.method import Job, MethodResult
from leafe.methods.distributed import (
    full_weights,
    lora_scaling,
    make_accelerator,
    merge_lora,
    mixed_precision,
    ran,
    sharded_launch,
    without_tied_head,
)
from leafe.methods.sft import bf16_state, make_batches
from leafe.methods.token_logprobs import logits_only_at, scored_positions, token_logprobs
from leafe.modelcard import save_model, write_model_card
from leafe.rollout import RolloutEngine
from leafe.rundir import claim
from leafe.settings import GenerationSettings, GRPOSettings

# -- the pieces of the objective (pure functions, tested by hand) ---------------------------------

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


# -- the trainer --------------------------------------------------------------------------------

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


def task_schedule(n_tasks: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the tasks of `step`: every task once per epoch, in a seeded order per epoch."""
    out = []
    for slot in range(step * per_step, (step + 1) * per_step):
        epoch, index = divmod(slot, n_tasks)
        order = list(range(n_tasks))
        random.Random(seed * 7919 + epoch).shuffle(order)
        out.append(order[index])
    return out


#: Why GRPO refuses sharded weights; `leafe launch` says it before launching, the trainer on start.
SHARDED_WEIGHTS = ("GRPO cannot sample from the policy it trains when its weights are sharded (FSDP, ZeRO-3): every "
                   "decode step would be a collective that ranks reach unequally; give the trainer a sampler of its "
                   "own (train_grpo gives each rank a whole copy, synced in memory)")


def check_tasks_per_step(per_step: int, processes: int) -> None:
    """Every rank samples the same number of a step's tasks (ranks meet in the same collectives)."""
    if per_step % processes:
        raise LeafeError(f"--tasks-per-step ({per_step}) must be a multiple of the {processes} processes, so that "
                         f"every rank samples as many tasks")


class GRPOTrainer:
    """Owns the policy, the sampler, the frozen reference and the optimiser.

    The sampler is either the hf backend holding the very policy being trained (its KV cache is
    dropped after each update) or another engine (vLLM) holding a copy, into which the policy's
    weights are synced after every optimiser step (`sync`); then the engine's log-probs of what it
    sampled weight each token's policy gradient (`importance_weights`, capped at `is_cap`).

    Under a multi-process launch (MULTI_GPU: DDP, a full copy per rank) each rank samples its share of
    the step's tasks with its own sampler, and the ranks meet only in collectives every rank reaches
    the same number of times: one gradient all-reduce per optimiser step and the sums for the log.
    Sharded weights (FSDP, ZeRO-3) are refused when the trainer samples itself: every decode step
    would be a collective.
    """

    def __init__(self, policy, sampler, settings: GRPOSettings, ref_model=None, envs: EnvMaker = make,
                 sync_dir: Path | None = None, shared: bool | None = None, precision: str | None = None):
        from accelerate import DistributedDataParallelKwargs, DistributedType

        self.sampler = sampler
        # the hf backend samples the policy itself (under LoRA: the base it holds, with the adapters in it)
        self.shared = getattr(sampler, "model", None) is policy if shared is None else shared
        self.lora = settings.lora
        self.settings = settings
        self.envs = envs  # envs.make, or a worker pool's (workers.env_workers)
        device = next(policy.parameters()).device
        # No buffer broadcast before each forward: DDP's default is a collective at the first forward
        # after a synced backward, and ranks run different numbers of forwards (their own micro-batches);
        # the model's only buffers (rotary frequencies) are constants.
        self.accelerator = make_accelerator(precision,
                                            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        self.sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if self.shared and self.sharded:
            raise LeafeError(SHARDED_WEIGHTS)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        if settings.activation_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.policy = policy
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=settings.learning_rate,
                                           weight_decay=settings.weight_decay)
        self.policy, self.optimizer = self.accelerator.prepare(self.policy, self.optimizer)
        self.ref = ref_model
        if self.ref is not None:
            self.ref.eval().requires_grad_(False)
            if self.sharded:  # split like the policy (frozen: no gradients, no optimiser state)
                self.ref = self.accelerator.prepare_model(self.ref, evaluation_mode=True)
            else:
                self.ref.to(device)
        pad = sampler.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0  # padding is masked out of attention and loss alike
        self.sync_dir = sync_dir
        self.sync_bytes = 0  # handed to the engine in memory by the last `sync`
        if self.sharded and self.lora:
            # FSDP2 fixes each layer's gradient dtype at its first forward, from the parameters that
            # require grad then; PEFT's disable_adapter (the reference) turns that off for the adapters,
            # so the first forward must be one with the adapters on (else bf16 gradients meet fp32 shards).
            with torch.no_grad():
                self._logprobs(self.policy, [])

    def rollout(self, tasks: list[Task], step: int) -> list[Episode]:
        s = self.settings
        seed = s.seed * 100_003 + step + 1_000_003 * self.rank  # ranks sample different tasks with other streams
        engine = RolloutEngine(self.sampler, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                               max_batch=len(tasks) * s.group_size, seed=seed, date_string=s.date_string,
                               logprobs=not self.shared)
        lives = (engine.start(self.envs(s.env, **s.env_params), task, {"sample": j})
                 for task in tasks for j in range(s.group_size))
        self.policy.eval()
        return engine.run(lives)

    def sync(self) -> float:
        """Give the sampler the policy's new weights; returns the seconds it took (0 when shared).

        In memory when the engine takes weights (`update_weights`: the hf engine's own copy, vLLM):
        every rank gathers the whole weights a layer at a time (`full_weights`; sharded ones are
        all-gathered, LoRA adapters merged) and hands them to its own engine; no file is written.
        An engine that cannot (vLLM replicas in other processes) reloads a Hugging Face directory
        that rank 0 writes into `sync_dir` (/dev/shm when there is one)."""
        if self.shared:
            self.sampler.cache.clear()  # cached keys/values belong to the old weights
            return 0.0
        started = time.perf_counter()
        self.sampler.wake_up()
        if hasattr(self.sampler, "update_weights"):
            self.sync_bytes = self.sampler.update_weights(full_weights(self.accelerator.unwrap_model(self.policy)))
        else:
            assert self.sync_dir is not None
            self.save_model(self.sync_dir)  # rank 0 writes; every local rank's engine reads the same directory
            self._barrier()
            self.sampler.load_weights(str(self.sync_dir))
            self._barrier()  # nobody reads it while rank 0 overwrites it next step
        return time.perf_counter() - started

    def save_model(self, path: Path) -> None:
        """The policy as a plain Hugging Face directory, in bf16 when training in bf16, else fp32;
        under LoRA, the adapters alone in `path/adapter` too. Every rank calls it: sharded weights
        are gathered on rank 0 (a collective), which writes."""
        state = self.accelerator.get_state_dict(self.policy)
        if self.rank != 0:
            return
        model = self.accelerator.unwrap_model(self.policy)
        if self.lora:
            model.save_pretrained(path / "adapter", state_dict=state)  # PEFT keeps the adapters' entries
            state = merge_lora(state, lora_scaling(model))
            model = model.get_base_model()
        state = without_tied_head(state, model)
        if self.accelerator.mixed_precision == "bf16":
            state = bf16_state(state)
        save_model(path, model, self.sampler.tokenizer, state)

    def ran(self) -> dict[str, Any]:
        """What this training ran on (`distributed.ran`), and how the sampler got the new weights."""
        to_engine = ("shared" if self.shared else "in-memory" if hasattr(self.sampler, "update_weights")
                     else "file")
        return {**ran(self.accelerator), "weights_to_engine": to_engine}

    def _barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def _micro_batches(self, samples: list[Sample], seed: int) -> list[list[Sample]]:
        order = make_batches([len(x.ids) for x in samples], batch_size=len(samples),
                             max_tokens=self.settings.max_batch_tokens, seed=seed)
        return [[samples[i] for i in batch] for batch in order]

    def _logprobs(self, model, batch: list[Sample], with_entropy: bool = False):
        """Log-probs at the sampling temperature: the policy's, the old policy's and the reference's alike.
        An empty micro-batch (sharded weights, see `update`) runs a forward for its collectives only."""
        if not batch:
            self._padding_forward(model)
            return torch.zeros(0, device=self.accelerator.device), None
        return agent_logprobs(model, [x.ids for x in batch], [x.mask for x in batch], self.pad_id, with_entropy,
                              temperature=self.settings.temperature)

    def _sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (every rank must call it)."""
        if self.world == 1:
            return values
        return self.accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=self.accelerator.device),
                                       "sum").tolist()

    def any_samples(self, samples: list[Sample]) -> bool:
        """Whether some rank has samples to learn from (then every rank takes part in the update)."""
        return self._sum([float(len(samples))])[0] > 0

    def merged(self, record: dict[str, Any], episodes: int) -> dict[str, Any]:
        """A step's log record over all ranks (every rank must call it)."""
        keys = ("groups", "skipped_groups", "env_steps", "generated_tokens", "faulted_episodes")
        sums = self._sum([*(float(record[k]) for k in keys), record["reward"] * episodes,
                          record["success"] * episodes, float(episodes)])
        out = record | {k: int(v) for k, v in zip(keys, sums)}
        out |= {"reward": sums[-3] / max(sums[-1], 1), "success": sums[-2] / max(sums[-1], 1),
                "skip_rate": out["skipped_groups"] / max(out["groups"], 1)}
        return out

    def _max(self, value: int) -> int:
        """The largest of the ranks' values (every rank must call it)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.long, device=self.accelerator.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def _padding_forward(self, model):
        """A forward on two padding tokens: a rank's share of the collectives when it has nothing to score."""
        ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.accelerator.device)
        return model(input_ids=ids, use_cache=False)

    def _zero_backward(self) -> None:
        """Join the gradient all-reduce with a zero gradient (a rank whose groups were all skipped)."""
        self.accelerator.backward(self._padding_forward(self.policy).logits.sum() * 0.0)

    def update(self, samples: list[Sample], seed: int) -> dict[str, float]:
        """`updates_per_batch` optimiser steps on one batch of samples; returns the last step's stats.

        With several ranks the loss is the mean over the agent tokens of all ranks' samples: each
        rank divides by the global token count and scales by the number of ranks (DDP averages).
        """
        s = self.settings
        batches = self._micro_batches(samples, seed) if samples else []
        if self.sharded:
            # Under sharded weights every forward and backward is a collective: every rank runs as many
            # micro-batches, a rank with fewer joining with empty ones (a forward, a zero gradient).
            batches += [[] for _ in range(self._max(len(batches)) - len(batches))]
        total = self._sum([float(sum(sum(x.mask[1:]) for x in samples))])[0]
        old: list[torch.Tensor] | None = None
        if s.updates_per_batch > 1:  # later passes need the log-probs of the weights that sampled
            with torch.no_grad():
                old = [self._logprobs(self.policy, b)[0] for b in batches]
        refs = []
        if self.ref is not None and s.kl_coef > 0:
            with torch.no_grad(), self.accelerator.autocast():
                refs = [self._logprobs(self.ref, b)[0] for b in batches]
        elif self.lora and s.kl_coef > 0:  # the reference is the starting model: the adapters switched off
            with torch.no_grad(), self.accelerator.autocast(), self.accelerator.unwrap_model(self.policy).disable_adapter():
                refs = [self._logprobs(self.policy, b)[0] for b in batches]
        self.policy.train()
        if not self.shared:
            self.sampler.sleep()  # a colocated engine hands its GPU memory to the update (GPUs only)
        for _ in range(s.updates_per_batch):
            # weighted_tokens: those with an engine log-prob; is_missing: tokens of samples with engine
            # log-probs whose own is missing; is_unweighted_tokens: tokens of samples without any
            sums = {"pg": 0.0, "kl": 0.0, "clipped": 0.0, "entropy": 0.0, "tokens": 0,
                    "is_weight": 0.0, "is_capped": 0.0, "sampler_gap": 0.0, "weighted_tokens": 0,
                    "is_missing": 0, "is_unweighted_tokens": 0}
            for i, batch in enumerate(batches):
                if not batch:
                    self._zero_backward()
                    continue
                # DDP all-reduces on the last micro-batch only: once per optimiser step on every rank.
                # FSDP reduce-scatters after every micro-batch: skipping it would keep whole unsharded
                # gradients on every rank (the memory sharding is for), and with bf16 parameters FSDP2
                # cannot add them into its fp32 gradient shards ("grad_dtype") anyway.
                last = i == len(batches) - 1 or self.sharded
                with contextlib.nullcontext() if last else self.accelerator.no_sync(self.policy):
                    with self.accelerator.autocast():
                        logp, entropy = self._logprobs(self.policy, batch, with_entropy=True)
                    adv = torch.cat([torch.full((sum(x.mask[1:]),), x.advantage) for x in batch]).to(logp.device)
                    before = old[i] if old is not None else logp.detach()  # the weights that sampled
                    is_weight = None
                    # sample by sample: one without engine log-probs leaves the others weighted
                    unweighted = sum(sum(x.mask[1:]) for x in batch if x.sampler_logp is None)
                    sums["is_unweighted_tokens"] += unweighted
                    if s.is_cap > 0 and any(x.sampler_logp is not None for x in batch):
                        sampled = sampler_logp_tensor(batch).to(logp.device)
                        reported = ~torch.isnan(sampled)
                        sums["is_missing"] += int((~reported).sum().item()) - unweighted
                        if bool(reported.any()):
                            is_weight = importance_weights(before, sampled, s.is_cap)
                            sums["is_weight"] += is_weight[reported].sum().item()
                            sums["is_capped"] += (is_weight[reported] >= s.is_cap).sum().item()
                            sums["sampler_gap"] += (before - sampled)[reported].abs().sum().item()
                            sums["weighted_tokens"] += int(reported.sum().item())
                    parts = token_loss(logp, before, refs[i] if refs else None, adv, s.clip_eps, s.kl_coef, total,
                                       is_weight)
                    self.accelerator.backward(parts.loss * self.world)
                sums["pg"] += parts.pg
                sums["kl"] += parts.kl
                sums["clipped"] += parts.clipped
                sums["entropy"] += entropy.sum().item()
                sums["tokens"] += parts.tokens
            if not batches:
                self._zero_backward()
            grad_norm = self.accelerator.clip_grad_norm_(self.policy.parameters(), s.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.policy.eval()
        sums = dict(zip(sums, self._sum([float(v) for v in sums.values()])))
        n = max(sums["tokens"], 1)
        out = {"loss": (sums["pg"] + s.kl_coef * sums["kl"]) / n, "pg_loss": sums["pg"] / n, "kl": sums["kl"] / n,
               "entropy": sums["entropy"] / n, "clip_frac": sums["clipped"] / n, "grad_norm": float(grad_norm),
               "agent_tokens": int(sums["tokens"])}
        if s.is_cap > 0 and (not self.shared or sums["weighted_tokens"] > 0):
            # how far the engine's numbers were from the trainer's (means over the weighted tokens), and
            # how many tokens went unweighted for want of an engine log-prob
            w = max(sums["weighted_tokens"], 1)
            out |= {"is_weight": sums["is_weight"] / w, "is_capped": sums["is_capped"] / w,
                    "sampler_gap": sums["sampler_gap"] / w, "is_missing": int(sums["is_missing"]),
                    "is_unweighted_tokens": int(sums["is_unweighted_tokens"])}
            self._warn_unweighted(out)
        return out

    #: Whether this run has warned about tokens without importance weights (once per run).
    _warned_unweighted = False

    def _warn_unweighted(self, record: dict[str, Any]) -> None:
        """Warn once (rank 0) when another engine sampled but some tokens had no engine log-prob."""
        missing, unweighted = record["is_missing"], record["is_unweighted_tokens"]
        if self.shared or self._warned_unweighted or self.rank != 0 or not (missing or unweighted):
            return
        self._warned_unweighted = True
        warnings.warn(f"GRPO: {unweighted} agent tokens of episodes without engine log-probs and {missing} tokens "
                      f"whose engine log-prob was missing kept importance weight 1 this step (counted per step "
                      f"in log.jsonl as is_unweighted_tokens and is_missing; warned once per run)", stacklevel=3)


# -- the run: resumable, logged, checkpointed -----------------------------------------------------

def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Checkpoints a run can resume from (those holding training state), oldest first."""
    found = []
    for path in (out / "checkpoints").glob("step-*"):
        resumable = (path / STATE).is_dir() or (path / "state.pt").exists()  # state.pt: before accelerate's state
        if resumable and path.name[5:].isdigit():
            found.append((int(path.name[5:]), path))
    return sorted(found)


#: A checkpoint's training state: accelerate's `save_state` (fp32 weights, optimiser, random states;
#: sharded the way the run is), kept on the newest checkpoint only.
STATE = "state"


def train_grpo(job: Job, settings: GRPOSettings, generation: GenerationSettings | None = None) -> MethodResult:
    """Train `job.model` with GRPO into `job.out` (a model directory with train.json and log.jsonl).

    `generation` names the rollout engine: hf (None too) samples from the policy being trained;
    vllm samples from its own copy, synced after every step (`GRPOTrainer.sync`). Checkpoints
    (`out/checkpoints/step-N`: the model, and on the newest one the training state) are written
    every `save_every` steps; a rerun with the same settings resumes from the latest one. The
    result's data holds the episode counts and the last step's reward, success, KL and entropy.
    """
    from transformers import AutoModelForCausalLM

    from leafe.backends.hf import HFBackend, pick_device

    settings.validate()
    engine = generation.backend if generation is not None else "hf"
    if engine == "openai":
        raise LeafeError("grpo needs a rollout engine it can give new weights after every step: --backend hf or "
                         "vllm (an openai server keeps its own)")
    model, device, envs = job.model, job.device, job.envs
    rank, world = process_rank()
    main = rank == 0  # the one writer of the log, checkpoints and model under a multi-process launch
    check_tasks_per_step(settings.tasks_per_step, world)
    if world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # "cuda" would load every rank's copy on GPU 0
    out = job.out
    out.mkdir(parents=True, exist_ok=True)
    claim(out / "grpo_settings.json", resume_fingerprint(settings, str(model)), "a GRPO run", write=main)
    finished = (expect(read_json(out / "train.json"), dict, out / "train.json", keys=("settings",))
                if (out / "train.json").exists() else None)
    if finished is not None and finished["settings"] == asdict(settings):
        return _result(finished, out)
    checkpoints = _checkpoints(out)
    start_step, resume_from = (checkpoints[-1] if checkpoints else (0, None))

    torch.manual_seed(settings.seed)
    start = str(resume_from or model)
    sync_dir = None
    precision = mixed_precision(job.precision)
    shared = engine == "hf" and not sharded_launch()
    if shared:
        sampler = HFBackend(start, device=device, dtype="float32")
        policy = sampler.model
    elif engine == "hf":
        # Sharded weights cannot sample (every decode step would be a collective): each rank samples
        # from its own whole copy, given the new weights in memory after every step (`sync`).
        sampler = HFBackend(start, device=device, dtype="bfloat16" if precision == "bf16" else "float32")
        with loading_model(start):
            policy = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
        policy.to(pick_device(device))
    else:
        from leafe.backends import backend_for

        # One engine per training process, colocated with it: the ranks are GRPO's data parallelism
        # (generation.data_parallel_size is the sampling stages'), and a rank sees one GPU.
        if world > 1 and generation.tensor_parallel_size > 1:
            raise LeafeError("GRPO on vllm with several training processes runs one engine per process on its own "
                             "GPU: set generation.tensor_parallel_size to 1 (or train in one process)")
        generation = dataclasses.replace(generation, data_parallel_size=1)
        cuda = torch.cuda.is_available()
        with _rank_gpu_only(world > 1 and cuda):  # each rank's engine on its own GPU
            # Colocated on GPUs: the engine sleeps during each update (see GRPOTrainer.update)
            sampler = backend_for(start, generation, **({"enable_sleep_mode": True} if cuda else {}))
        with loading_model(start):
            policy = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
        policy.to(pick_device(device))  # where the hf path's backend would put it
        if not hasattr(sampler, "update_weights"):  # replicas reload a directory; an engine here takes memory
            sync_dir = _sync_dir(out)
    if settings.lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                                                   target_modules="all-linear", task_type="CAUSAL_LM"))
    ref = None
    if settings.kl_coef > 0 and not settings.lora:  # frozen, in bf16 on GPUs (the precision of the forward)
        bf16 = precision == "bf16" and torch.cuda.is_available()
        with loading_model(model):
            ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if bf16 else torch.float32)
    trainer = GRPOTrainer(policy, sampler, settings, ref, envs, sync_dir, shared=shared, precision=precision)
    log_path = out / "log.jsonl"
    logged = list(read_jsonl(log_path))
    log = [r for r in logged if r["step"] <= start_step]
    if len(log) < len(logged) and main:  # steps logged after the checkpoint we resume from are redone
        write_jsonl(log_path, log)
    if resume_from is not None and (resume_from / STATE).is_dir():
        trainer.accelerator.load_state(str(resume_from / STATE))
    elif resume_from is not None:  # a checkpoint written before training state moved to accelerate's
        state = torch.load(resume_from / "state.pt", weights_only=False)
        trainer.optimizer.load_state_dict(state["optimizer"])
    job.progress.start(settings.steps, start_step)

    env = make(settings.env, **settings.env_params)
    tasks = env.make_tasks(settings.tasks, settings.task_seed)
    try:
        for step in range(start_step, settings.steps):
            started = time.perf_counter()
            schedule = task_schedule(len(tasks), settings.tasks_per_step, step, settings.seed)
            chosen = [tasks[i] for i in schedule[rank::world]]  # this rank's share of the step's tasks
            episodes = trainer.rollout(chosen, step)
            sampled_s = time.perf_counter() - started  # the rest of wall_s is the update (about half on a CPU)
            samples, stats = group_samples(episodes, settings.invalid_penalty, settings.adv_eps)
            record: dict[str, Any] = {"step": step + 1, **stats}
            # faulted_episodes: runs whose env failed (sandbox_error), thrown away and run again: never a reward
            record |= {"env_steps": sum(len(e.steps) for e in episodes),
                       "generated_tokens": sum(e.generated_tokens for e in episodes),
                       "faulted_episodes": sum(e.meta.get("faulted_runs", 0) for e in episodes)}
            if world > 1:
                record = trainer.merged(record, len(episodes))
            if trainer.any_samples(samples):
                record |= trainer.update(samples, seed=settings.seed * 1_000_033 + step)
                record["sync_s"] = round(trainer.sync(), 3)
            record["rollout_s"] = round(sampled_s, 3)
            record["wall_s"] = round(time.perf_counter() - started, 3)
            if main:
                append_jsonl(log_path, record)
                job.tracker.log(record, step=record["step"])  # the same figures, to the run's trackers
            log.append(record)
            job.progress.advance(status=f"success {record['success']:.2f} kl {record.get('kl', 0):.4f}")
            done = step + 1
            if settings.save_every and done % settings.save_every == 0 and done < settings.steps:
                _save_checkpoint(trainer, out, done, settings.keep_checkpoints,
                                 card={"base_model": str(model), "data": _trained_on(log, settings)})
    finally:
        if not trainer.shared:
            sampler.close()  # the engine goes before anything else loads a model
            if sync_dir is not None and main:
                shutil.rmtree(sync_dir, ignore_errors=True)

    # The final model is whole before it is in OUT (`publish_model_dir`): a run killed while writing it
    # leaves no directory that loads as a finished model, and its rerun resumes from the last checkpoint.
    from leafe.files import MODEL_STAGING, publish_model_dir

    if main:
        shutil.rmtree(out / MODEL_STAGING, ignore_errors=True)
    trainer.save_model(out / MODEL_STAGING)
    if main:
        publish_model_dir(out)
    summary = {
        "method": "grpo",
        "model": str(model),
        "settings": asdict(settings),
        "data": {k: v for k, v in _trained_on(log, settings).items() if k != "steps"},
        "cost": {"env_steps": sum(r["env_steps"] for r in log),
                 "generated_tokens": sum(r["generated_tokens"] for r in log),
                 "wall_s": round(sum(r["wall_s"] for r in log), 2), "ran": trainer.ran()},
        "final": {k: log[-1].get(k) for k in ("reward", "success", "kl", "entropy")} if log else {},
    }
    if main:  # the card before train.json, which marks the run finished
        write_model_card(out, str(model), "grpo", summary["settings"], _trained_on(log, settings))
        write_json(out / "train.json", summary)
    if world > 1:  # the model is written before any rank reports done; ranks leave the process group together
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()
        _KEPT_UNTIL_EXIT.append(trainer)
    return _result(summary, out)


#: A multi-process trainer outlives `train_grpo` (the launched job then ends with os._exit, in
#: `leafe.scale.stage`): freeing its DDP model runs ProcessGroupGloo's destructor, which joins a gloo
#: thread while holding the GIL, and that thread can be waiting for the GIL to drop a Python object.
#: CI hung there once, after the model was written (py-spy: ~Reducer -> ~ProcessGroupGloo -> join).
_KEPT_UNTIL_EXIT: list = []


@contextlib.contextmanager
def _rank_gpu_only(active: bool):
    """While starting a rank's vLLM engine under a multi-process launch, show its child processes
    (vLLM's engine core and workers) only this rank's GPU, as the vllm replicas do; unverified on
    GPUs so far (benchmarks/gpu_check.sh runs one process)."""
    if not active:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [d for d in (before or "").split(",") if d] or [str(i) for i in range(torch.cuda.device_count())]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[int(os.environ.get("LOCAL_RANK", "0"))]
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _sync_dir(out: Path) -> Path:
    """Where the policy's weights are written for the engine after each step: shared memory when the
    machine has it (no disk traffic), else beside the run; one name per run, the same on every rank
    (rank 0 writes it, every rank's engine reads it)."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else out
    path = base / f"leafe-grpo-sync-{zlib.crc32(str(out.resolve()).encode()):08x}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _trained_on(log: list[dict[str, Any]], settings: GRPOSettings) -> dict[str, Any]:
    """What the steps in `log` trained on: train.json's data, and a model card's counts."""
    return {"steps": len(log), "tasks": settings.tasks,
            "episodes": sum(r["groups"] for r in log) * settings.group_size,
            "groups": sum(r["groups"] for r in log), "skipped_groups": sum(r["skipped_groups"] for r in log),
            "agent_tokens": sum(r.get("agent_tokens", 0) for r in log),
            "faulted_episodes": sum(r.get("faulted_episodes", 0) for r in log)}


def _result(summary: dict[str, Any], out: Path) -> MethodResult:
    """train.json as the method contract's result: the trained model is the output directory."""
    return MethodResult("grpo", str(out), summary["settings"], {**summary["data"], "final": summary["final"]},
                        summary["cost"])


def _save_checkpoint(trainer: GRPOTrainer, out: Path, step: int, keep: int, card: dict[str, Any]) -> None:
    """The model of `step` (a plain directory a user can keep, with its model card: `card` holds the
    base model and the counts so far) and the training state to resume
    from, written under a temporary name and renamed when complete. Every rank calls it (gathering
    sharded weights and saving sharded state are collectives); rank 0 renames and prunes: older
    checkpoints lose their training state, and only the newest `keep` models stay.

    A save that fails (a full disk: `DiskFull`, one line naming the checkpoint) leaves the checkpoints
    as they were: the temporary one is deleted (its space freed; `_checkpoints` never takes its name
    for one), the older ones are pruned only after the rename, so a rerun resumes from the last one."""
    final = out / "checkpoints" / f"step-{step}"
    tmp = out / "checkpoints" / f".step-{step}.tmp"
    if trainer.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer._barrier()
    with writing(final, scratch=tmp if trainer.rank == 0 else None):
        trainer.save_model(tmp)
        if trainer.rank == 0:
            write_model_card(tmp, card["base_model"], "grpo", asdict(trainer.settings), card["data"])
        # accelerate warns that it drops the tied output head from the safetensors file, at every save; the
        # head is the embedding matrix itself, so loading the state (tested by the resume test) restores it.
        shared_warning = logging.getLogger("accelerate.utils.other")
        level = shared_warning.level
        shared_warning.setLevel(logging.ERROR)
        try:
            trainer.accelerator.save_state(str(tmp / STATE))
        finally:
            shared_warning.setLevel(level)
    trainer._barrier()
    if trainer.rank != 0:
        return
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for _, older in _checkpoints(out)[:-1]:
        shutil.rmtree(older / STATE, ignore_errors=True)
        (older / "state.pt").unlink(missing_ok=True)
    models = sorted((int(p.name[5:]), p) for p in (out / "checkpoints").glob("step-*") if p.name[5:].isdigit())
    for _, older in models[:-keep]:
        shutil.rmtree(older, ignore_errors=True)
