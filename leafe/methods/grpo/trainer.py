"""`GRPOTrainer`: the policy, the sampler, the frozen reference and the optimiser of a GRPO run.

It samples a step's episodes through the rollout engine, makes one update of `objective`'s loss on
them (micro-batched, over every rank's samples), and hands the new weights to the sampler. The run
around it (tasks, log, checkpoints, the final model) is `leafe.methods.grpo.run`.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from leafe.envs import EnvMaker, make
from leafe.envs.base import Task
from leafe.episode import Episode
from leafe.errors import LeafeError
from leafe.methods.distributed import full_weights, lora_scaling, make_accelerator, merge_lora, ran, without_tied_head
from leafe.methods.grpo.objective import Sample, agent_logprobs, importance_weights, sampler_logp_tensor, token_loss
from leafe.methods.sft import bf16_state, make_batches
from leafe.modelcard import save_model
from leafe.rollout import RolloutEngine
from leafe.settings import GRPOSettings

#: Why GRPO refuses sharded weights; `leafe launch` says it before launching, the trainer on start.
SHARDED_WEIGHTS = ("GRPO cannot sample from the policy it trains when its weights are sharded (FSDP, ZeRO-3): every "
                   "decode step would be a collective that ranks reach unequally; give the trainer a sampler of its "
                   "own (train_grpo gives each rank a whole copy, synced in memory)")


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
            self.barrier()
            self.sampler.load_weights(str(self.sync_dir))
            self.barrier()  # nobody reads it while rank 0 overwrites it next step
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

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""
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
