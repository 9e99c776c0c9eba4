"""`train_grpo`, a GRPO run: resumable, logged, checkpointed.

Each step samples its tasks (every task once per epoch, `task_schedule`; under a multi-process launch
each rank its share), turns the episodes into loss samples, updates the policy and syncs the
sampler; the step's record goes to log.jsonl and the run's trackers. A rerun with the same settings
resumes from the newest checkpoint, and a finished run returns its train.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from leafe.backends.base import loading_model
from leafe.envs import make
from leafe.errors import LeafeError
from leafe.files import append_jsonl, expect, process_rank, read_json, read_jsonl, write_json, write_jsonl
from leafe.fingerprint import resume_fingerprint
from leafe.method import Job, MethodResult
from leafe.methods.distributed import mixed_precision, sharded_launch
from leafe.methods.grpo.checkpoints import STATE, resumable_checkpoints, save_checkpoint
from leafe.methods.grpo.objective import group_samples
from leafe.methods.grpo.trainer import GRPOTrainer
from leafe.modelcard import write_model_card
from leafe.rundir import claim
from leafe.settings import GenerationSettings, GRPOSettings


def task_schedule(n_tasks: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the tasks of `step`: every task once per epoch, in a seeded order per epoch."""
    out = []
    for slot in range(step * per_step, (step + 1) * per_step):
        epoch, index = divmod(slot, n_tasks)
        order = list(range(n_tasks))
        random.Random(seed * 7919 + epoch).shuffle(order)
        out.append(order[index])
    return out


def check_tasks_per_step(per_step: int, processes: int) -> None:
    """Every rank samples the same number of a step's tasks (ranks meet in the same collectives)."""
    if per_step % processes:
        raise LeafeError(f"--tasks-per-step ({per_step}) must be a multiple of the {processes} processes, so that "
                         f"every rank samples as many tasks")


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
    checkpoints = resumable_checkpoints(out)
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
    if resume_from is not None:
        trainer.accelerator.load_state(str(resume_from / STATE))
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
                save_checkpoint(trainer, out, done, settings.keep_checkpoints,
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
#: thread while holding the GIL, and that thread can be waiting for the GIL to drop a Python object:
#: a deadlock (~Reducer -> ~ProcessGroupGloo -> join) after the model is written. Kept here, it is never freed.
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
            "faulted_episodes": sum(r["faulted_episodes"] for r in log)}


def _result(summary: dict[str, Any], out: Path) -> MethodResult:
    """train.json as the method contract's result: the trained model is the output directory."""
    return MethodResult("grpo", str(out), summary["settings"], {**summary["data"], "final": summary["final"]},
                        summary["cost"])
