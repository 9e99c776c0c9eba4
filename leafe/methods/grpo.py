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

Why not TRL's GRPOTrainer: its `rollout_func`/`env_mask` path (experimental in TRL 1.16) could carry
our multi-turn episodes, but zero-variance groups stay in its batch (their tokens still count in the
loss normaliser and still carry the KL term), and its sampling without vLLM is its own `generate`
call, not our backend with its prefix cache. So this is a compact trainer on accelerate: sampling
goes through `rollout.py` with the backend holding the very weights being trained (its KV cache is
dropped after each update), and the loss, logging and checkpoints live here.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
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
from leafe.files import append_jsonl, process_rank, read_json, read_jsonl, write_json, write_jsonl
from leafe.fingerprint import resume_fingerprint
from leafe.method import Job, MethodResult
from leafe.methods.sft import make_batches
from leafe.rollout import RolloutEngine
from leafe.rundir import claim
from leafe.settings import GRPOSettings

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
) -> LossParts:
    """The clipped surrogate plus k3 KL over flat agent tokens, summed and divided by `normalizer`.

    All tensors are 1-D over the same agent tokens; `advantages` holds each token's episode advantage.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    pg = -torch.minimum(unclipped, clipped)
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
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the masked tokens of each sequence under `model`, flattened in sequence order.

    Token j of a sequence is scored by the logits at j - 1, so a mask's first position never counts
    (the first token of an episode is never the agent's). With `with_entropy`, also the entropy of
    the full next-token distribution at each of those positions.
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
    ids, attention, select = ids.to(device), attention.to(device), select.to(device)
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]
    targets = select[:, 1:]
    chosen = logits[targets].float()  # (tokens, vocab): only agent positions go through the softmax
    logp_all = torch.log_softmax(chosen, dim=-1)
    logp = logp_all.gather(-1, ids[:, 1:][targets][:, None]).squeeze(-1)
    entropy = None
    if with_entropy:  # for logging only: no graph
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# -- the trainer --------------------------------------------------------------------------------

@dataclass
class Sample:
    """One episode as the loss sees it: its exact ids, the agent-token mask, its advantage."""

    ids: list[int]
    mask: list[int]
    advantage: float


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
                out.append(Sample(e.token_ids, mask, a))
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
SHARDED_WEIGHTS = ("GRPO samples in process from the policy it trains, and with sharded weights (FSDP, ZeRO-3) every "
                   "decode step would be a collective that ranks reach unequally; launch it with a MULTI_GPU (DDP) config")


def check_tasks_per_step(per_step: int, processes: int) -> None:
    """Every rank samples the same number of a step's tasks (ranks meet in the same collectives)."""
    if per_step % processes:
        raise LeafeError(f"--tasks-per-step ({per_step}) must be a multiple of the {processes} processes, so that "
                         f"every rank samples as many tasks")


class GRPOTrainer:
    """Owns the policy (shared with the sampling backend), the frozen reference and the optimiser.

    Under a multi-process launch (MULTI_GPU: DDP, a full copy per rank) each rank samples its share of
    the step's tasks with its own copy, and the ranks meet only in collectives every rank reaches the
    same number of times: one gradient all-reduce per optimiser step and the sums for the log.
    Sharded weights (FSDP, ZeRO-3) are refused: sampling would turn every decode step into a collective.
    """

    def __init__(self, backend, settings: GRPOSettings, ref_model=None, envs: EnvMaker = make):
        from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType

        self.backend = backend
        self.settings = settings
        self.envs = envs  # envs.make, or a worker pool's (workers.env_workers)
        cuda = backend.device.type == "cuda"
        # No buffer broadcast before each forward: DDP's default is a collective at the first forward
        # after a synced backward, and ranks run different numbers of forwards (their own micro-batches);
        # the model's only buffers (rotary frequencies) are constants.
        self.accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda and torch.cuda.is_bf16_supported() else "no",
                                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise LeafeError(SHARDED_WEIGHTS)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.policy = backend.model
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=settings.learning_rate,
                                           weight_decay=settings.weight_decay)
        self.policy, self.optimizer = self.accelerator.prepare(self.policy, self.optimizer)
        self.ref = ref_model
        if self.ref is not None:
            self.ref.to(backend.device).eval().requires_grad_(False)
        self.pad_id = backend.pad_id

    def rollout(self, tasks: list[Task], step: int) -> list[Episode]:
        s = self.settings
        seed = s.seed * 100_003 + step + 1_000_003 * self.rank  # ranks sample different tasks with other streams
        engine = RolloutEngine(self.backend, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                               max_batch=len(tasks) * s.group_size, seed=seed, date_string=s.date_string)
        lives = (engine.start(self.envs(s.env, **s.env_params), task, {"sample": j})
                 for task in tasks for j in range(s.group_size))
        self.policy.eval()
        return engine.run(lives)

    def _micro_batches(self, samples: list[Sample], seed: int) -> list[list[Sample]]:
        order = make_batches([len(x.ids) for x in samples], batch_size=len(samples),
                             max_tokens=self.settings.max_batch_tokens, seed=seed)
        return [[samples[i] for i in batch] for batch in order]

    def _logprobs(self, model, batch: list[Sample], with_entropy: bool = False):
        return agent_logprobs(model, [x.ids for x in batch], [x.mask for x in batch], self.pad_id, with_entropy)

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
        keys = ("groups", "skipped_groups", "env_steps", "generated_tokens")
        sums = self._sum([*(float(record[k]) for k in keys), record["reward"] * episodes,
                          record["success"] * episodes, float(episodes)])
        out = record | {k: int(v) for k, v in zip(keys, sums)}
        out |= {"reward": sums[4] / max(sums[6], 1), "success": sums[5] / max(sums[6], 1),
                "skip_rate": out["skipped_groups"] / max(out["groups"], 1)}
        return out

    def _zero_backward(self) -> None:
        """Join the gradient all-reduce with a zero gradient (a rank whose groups were all skipped)."""
        ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.accelerator.device)
        self.accelerator.backward(self.policy(input_ids=ids, use_cache=False).logits.sum() * 0.0)

    def update(self, samples: list[Sample], seed: int) -> dict[str, float]:
        """`updates_per_batch` optimiser steps on one batch of samples; returns the last step's stats.

        With several ranks the loss is the mean over the agent tokens of all ranks' samples: each
        rank divides by the global token count and scales by the number of ranks (DDP averages).
        """
        s = self.settings
        batches = self._micro_batches(samples, seed) if samples else []
        total = self._sum([float(sum(sum(x.mask[1:]) for x in samples))])[0]
        old: list[torch.Tensor] | None = None
        if s.updates_per_batch > 1:  # later passes need the log-probs of the weights that sampled
            with torch.no_grad():
                old = [self._logprobs(self.policy, b)[0] for b in batches]
        refs = []
        if self.ref is not None and s.kl_coef > 0:
            with torch.no_grad(), self.accelerator.autocast():
                refs = [self._logprobs(self.ref, b)[0] for b in batches]
        self.policy.train()
        for _ in range(s.updates_per_batch):
            sums = {"pg": 0.0, "kl": 0.0, "clipped": 0.0, "entropy": 0.0, "tokens": 0}
            for i, batch in enumerate(batches):
                # DDP all-reduces on the last micro-batch only: once per optimiser step on every rank
                last = i == len(batches) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(self.policy):
                    with self.accelerator.autocast():
                        logp, entropy = self._logprobs(self.policy, batch, with_entropy=True)
                    adv = torch.cat([torch.full((sum(x.mask[1:]),), x.advantage) for x in batch]).to(logp.device)
                    parts = token_loss(logp, old[i] if old is not None else logp.detach(), refs[i] if refs else None,
                                       adv, s.clip_eps, s.kl_coef, total)
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
        self.backend.cache.clear()  # cached keys/values belong to the old weights
        sums = dict(zip(sums, self._sum([float(v) for v in sums.values()])))
        n = max(sums["tokens"], 1)
        return {"loss": (sums["pg"] + s.kl_coef * sums["kl"]) / n, "pg_loss": sums["pg"] / n, "kl": sums["kl"] / n,
                "entropy": sums["entropy"] / n, "clip_frac": sums["clipped"] / n, "grad_norm": float(grad_norm),
                "agent_tokens": int(sums["tokens"])}


# -- the run: resumable, logged, checkpointed -----------------------------------------------------

def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    found = []
    for path in (out / "checkpoints").glob("step-*"):
        if (path / "state.pt").exists() and path.name[5:].isdigit():
            found.append((int(path.name[5:]), path))
    return sorted(found)


def train_grpo(job: Job, settings: GRPOSettings) -> MethodResult:
    """Train `job.model` with GRPO into `job.out` (a model directory with train.json and log.jsonl).

    Checkpoints (`out/checkpoints/step-N`: weights, optimiser state) are written every `save_every`
    steps; a rerun with the same settings resumes from the latest one. The result's data holds the
    episode counts and the last step's reward, success, KL and entropy (`final`).
    """
    from transformers import AutoModelForCausalLM

    from leafe.backends.hf import HFBackend

    settings.validate()
    model, device, envs = job.model, job.device, job.envs
    rank, world = process_rank()
    main = rank == 0  # the one writer of the log, checkpoints and model under a multi-process launch
    check_tasks_per_step(settings.tasks_per_step, world)
    if world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # "cuda" would load every rank's copy on GPU 0
    out = job.out
    out.mkdir(parents=True, exist_ok=True)
    claim(out / "grpo_settings.json", resume_fingerprint(settings, str(model)), "a GRPO run", write=main)
    finished = read_json(out / "train.json") if (out / "train.json").exists() else None
    if finished is not None and finished["settings"] == asdict(settings):
        return _result(finished, out)
    checkpoints = _checkpoints(out)
    start_step, resume_from = (checkpoints[-1] if checkpoints else (0, None))

    torch.manual_seed(settings.seed)
    backend = HFBackend(str(resume_from or model), device=device, dtype="float32")
    ref = None
    if settings.kl_coef > 0:
        with loading_model(model):
            ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    trainer = GRPOTrainer(backend, settings, ref, envs)
    log_path = out / "log.jsonl"
    logged = list(read_jsonl(log_path))
    log = [r for r in logged if r["step"] <= start_step]
    if len(log) < len(logged) and main:  # steps logged after the checkpoint we resume from are redone
        write_jsonl(log_path, log)
    if resume_from is not None:
        state = torch.load(resume_from / "state.pt", weights_only=False)
        trainer.optimizer.load_state_dict(state["optimizer"])
    job.progress.start(settings.steps, start_step)

    env = make(settings.env, **settings.env_params)
    tasks = env.make_tasks(settings.tasks, settings.task_seed)
    for step in range(start_step, settings.steps):
        started = time.perf_counter()
        schedule = task_schedule(len(tasks), settings.tasks_per_step, step, settings.seed)
        chosen = [tasks[i] for i in schedule[rank::world]]  # this rank's share of the step's tasks
        episodes = trainer.rollout(chosen, step)
        sampled_s = time.perf_counter() - started  # the rest of wall_s is the update (about half on a CPU)
        samples, stats = group_samples(episodes, settings.invalid_penalty, settings.adv_eps)
        record: dict[str, Any] = {"step": step + 1, **stats}
        record |= {"env_steps": sum(len(e.steps) for e in episodes),
                   "generated_tokens": sum(e.generated_tokens for e in episodes)}
        if world > 1:
            record = trainer.merged(record, len(episodes))
        if trainer.any_samples(samples):
            record |= trainer.update(samples, seed=settings.seed * 1_000_033 + step)
        record["rollout_s"] = round(sampled_s, 3)
        record["wall_s"] = round(time.perf_counter() - started, 3)
        if main:
            append_jsonl(log_path, record)
        log.append(record)
        job.progress.advance(status=f"success {record['success']:.2f} kl {record.get('kl', 0):.4f}")
        done = step + 1
        if settings.save_every and done % settings.save_every == 0 and done < settings.steps and main:
            _save_checkpoint(trainer, out, done, settings.keep_checkpoints)

    if main:
        trainer.accelerator.unwrap_model(trainer.policy).save_pretrained(out)
        backend.tokenizer.save_pretrained(out)
    summary = {
        "method": "grpo",
        "model": str(model),
        "settings": asdict(settings),
        "data": {"tasks": settings.tasks, "episodes": sum(r["groups"] for r in log) * settings.group_size,
                 "groups": sum(r["groups"] for r in log), "skipped_groups": sum(r["skipped_groups"] for r in log),
                 "agent_tokens": sum(r.get("agent_tokens", 0) for r in log)},
        "cost": {"env_steps": sum(r["env_steps"] for r in log),
                 "generated_tokens": sum(r["generated_tokens"] for r in log),
                 "wall_s": round(sum(r["wall_s"] for r in log), 2)},
        "final": {k: log[-1].get(k) for k in ("reward", "success", "kl", "entropy")} if log else {},
    }
    if main:
        write_json(out / "train.json", summary)
    if world > 1:  # the model is written before any rank reports done; ranks leave the process group together
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()
    return _result(summary, out)


def _result(summary: dict[str, Any], out: Path) -> MethodResult:
    """train.json as the method contract's result: the trained model is the output directory."""
    return MethodResult("grpo", str(out), summary["settings"], {**summary["data"], "final": summary["final"]},
                        summary["cost"])


def _save_checkpoint(trainer: GRPOTrainer, out: Path, step: int, keep: int) -> None:
    """Weights and optimiser state of `step`, written to a temporary name and renamed when complete."""
    final = out / "checkpoints" / f"step-{step}"
    tmp = out / "checkpoints" / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.unwrap_model(trainer.policy).save_pretrained(tmp)
    trainer.backend.tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": trainer.optimizer.state_dict(), "step": step}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for _, old in _checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
