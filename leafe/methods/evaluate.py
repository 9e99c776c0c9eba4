"""Evaluation: n independent episodes per task -> per-task (n, c) -> Pass@k with intervals.

Plain rollouts of the policy, as at test time in the paper: no reflection, no rollback. Results are
written per task as each task's n episodes finish (`eval_tasks.jsonl`), so an interrupted evaluation
resumes where it stopped; `eval.json` is written atomically at the end.

An episode whose env failed in its own machinery (a `sandbox_error` of the code judge) is no failure
of the model: the rollout engine runs it again, so every task still has its n scored episodes, and
`faulted_episodes` in eval.json counts the runs thrown away.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from leafe.envs import make
from leafe.episode import Episode
from leafe.errors import LeafeError
from leafe.files import append_jsonl, expect, read_jsonl, write_json
from leafe.fingerprint import resume_fingerprint
from leafe.method import Job, MethodResult, Tally, cost
from leafe.passk import default_ks, summarize
from leafe.prompts import playbook_system_prompt
from leafe.rollout import RolloutEngine
from leafe.rundir import check_resume
from leafe.settings import EvalSettings


def evaluate(job: Job, settings: EvalSettings, *, save_episodes: bool = False) -> MethodResult:
    """Evaluate `job.model` through `job.backend` and write `job.out/eval.json`; the result's data is
    its content (Pass@k, intervals, per-task counts). `save_episodes` also writes every episode."""
    settings.validate()
    backend, out = job.backend, job.out
    if backend is None:
        raise LeafeError("evaluate samples: give it a backend (Job.backend)")
    out.mkdir(parents=True, exist_ok=True)
    progress_path = out / "eval_tasks.jsonl"
    fingerprint = resume_fingerprint(settings, job.model)
    done = _load_progress(progress_path, fingerprint)
    if not progress_path.exists() or not progress_path.stat().st_size:
        append_jsonl(progress_path, {"settings": fingerprint})

    env_proto = make(settings.env, **settings.env_params)
    tasks = env_proto.make_tasks(settings.tasks, settings.task_seed)
    todo = [t for t in tasks if t.task_id not in done]
    job.progress.start(len(tasks) * settings.samples, (len(tasks) - len(todo)) * settings.samples)
    tally = Tally(job.progress)

    engine = RolloutEngine(
        backend,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        max_batch=settings.max_batch,
        seed=settings.seed,
        system=playbook_system_prompt(settings.playbook),
        date_string=settings.date_string,
    )
    session, started = uuid.uuid4().hex[:8], time.perf_counter()
    pending: dict[str, list[Episode]] = defaultdict(list)

    def finished(episode: Episode) -> None:
        pending[episode.task_id].append(episode)
        tally(episode.success)
        if len(pending[episode.task_id]) < settings.samples:
            return
        episodes = pending.pop(episode.task_id)
        if save_episodes:
            for e in sorted(episodes, key=lambda e: e.meta["sample"]):
                append_jsonl(out / "episodes.jsonl", e.to_dict())
        record = {
            "task_id": episode.task_id,
            "n": len(episodes),
            "c": sum(e.success for e in episodes),
            "env_steps": sum(len(e.steps) for e in episodes),
            "generated_tokens": sum(e.generated_tokens for e in episodes),
            "faulted_episodes": sum(e.meta.get("faulted_runs", 0) for e in episodes),  # run again, never scored
            "session": session,
            "elapsed_s": round(time.perf_counter() - started, 3),
        }
        append_jsonl(progress_path, record)
        done[record["task_id"]] = record

    lives = (
        engine.start(job.envs(settings.env, **settings.env_params), task, {"sample": j})
        for task in todo
        for j in range(settings.samples)
    )
    prefill_before = backend.stats.prefill_tokens
    engine.run(lives, on_finish=finished)

    records = [done[t.task_id] for t in tasks]
    counts = [(r["n"], r["c"]) for r in records]
    ks = settings.ks or default_ks(settings.samples)
    sessions: dict[str, float] = {}
    for r in records:
        sessions[r["session"]] = max(sessions.get(r["session"], 0.0), r["elapsed_s"])
    result = {
        "model": job.model,
        "env": settings.env,
        "env_params": settings.env_params,
        "task_seed": settings.task_seed,
        "samples": settings.samples,
        "temperature": settings.temperature,
        "playbook_lessons": len(settings.playbook),
        **summarize(counts, ks),
        "tasks": [{"task_id": r["task_id"], "n": r["n"], "c": r["c"]} for r in records],
        "env_steps": sum(r["env_steps"] for r in records),
        "generated_tokens": sum(r["generated_tokens"] for r in records),
        # episodes whose env failed (sandbox_error): run again, none of them scored
        "faulted_episodes": sum(r["faulted_episodes"] for r in records),
        "prefill_tokens": backend.stats.prefill_tokens - prefill_before,
        "wall_s": round(sum(sessions.values()), 3),
    }
    write_json(out / "eval.json", result)
    return MethodResult("eval", job.model, asdict(settings), result,
                        cost(result["env_steps"], result["generated_tokens"], result["wall_s"]))


def _load_progress(path: Path, fingerprint: dict[str, Any]) -> dict[str, dict]:
    records = list(read_jsonl(path))
    if not records:
        return {}
    check_resume(expect(records[0], dict, path, ("settings",))["settings"] or {}, fingerprint, path.parent,
                 "a partial evaluation")
    # what the result reads of each task's record
    keys = ("task_id", "n", "c", "env_steps", "generated_tokens", "faulted_episodes", "session", "elapsed_s")
    return {expect(r, dict, path, keys)["task_id"]: r for r in records[1:]}
