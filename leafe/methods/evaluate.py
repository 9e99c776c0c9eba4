"""Evaluation: n independent episodes per task -> per-task (n, c) -> Pass@k with intervals.

Plain rollouts of the policy, as at test time in the paper: no reflection, no rollback. Results are
written per task as each task's n episodes finish (`eval_tasks.jsonl`), so an interrupted evaluation
resumes where it stopped; `eval.json` is written atomically at the end.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from leafe.backends.base import Backend
from leafe.envs import EnvMaker, make
from leafe.episode import Episode
from leafe.errors import LeafeError
from leafe.files import append_jsonl, read_jsonl, write_json
from leafe.passk import default_ks, summarize
from leafe.prompts import playbook_system_prompt
from leafe.rollout import RolloutEngine


@dataclass
class EvalSettings:
    env: str = "sokoban"
    env_params: dict[str, Any] = field(default_factory=dict)
    tasks: int = 50
    task_seed: int = 1000
    samples: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    ks: list[int] | None = None
    #: ACE lessons put in the system prompt (empty: the plain system prompt).
    playbook: list[str] = field(default_factory=list)
    #: Episodes advanced together per generate call: speed and memory. Another value draws other
    #: random numbers (not another distribution), so a run resumes under any value.
    max_batch: int = 64

    #: Fields that change speed or memory, not results: a run resumes (and a study stage stays
    #: done) whatever their value.
    speed_only: ClassVar[tuple[str, ...]] = ("max_batch",)

    def validate(self) -> None:
        if self.tasks < 1:
            raise LeafeError(f"--tasks must be >= 1 (got {self.tasks})")
        if self.samples < 1:
            raise LeafeError(f"--samples must be >= 1 (got {self.samples})")
        if self.max_batch < 1:
            raise LeafeError(f"--batch-size must be >= 1 (got {self.max_batch})")
        for k in self.ks or []:
            if k < 1:
                raise LeafeError(f"every k must be >= 1 (got {k})")
            if k > self.samples:
                raise LeafeError(f"--samples must be >= max k (got {self.samples} < {k})")
        if self.temperature < 0:
            raise LeafeError(f"--temperature must be >= 0 (got {self.temperature})")

    def fingerprint(self, model: str) -> dict[str, Any]:
        """What must match for an existing partial evaluation to be resumed."""
        data = {k: v for k, v in asdict(self).items() if k not in self.speed_only}
        data.pop("ks")
        if not data["playbook"]:  # runs from before playbooks existed stay resumable
            data.pop("playbook")
        data["model"] = model
        return data


def evaluate(
    backend: Backend,
    model_name: str,
    settings: EvalSettings,
    out_dir: str | Path,
    *,
    save_episodes: bool = False,
    on_episode: Callable[[Episode], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    envs: EnvMaker = make,
) -> dict[str, Any]:
    """Evaluate and write `out_dir/eval.json`; returns its content.

    `envs` makes each episode's env: `envs.make` in process, or a worker pool's (`workers.env_workers`).

    `on_start(total_episodes, already_done)` is called once the resume state is known, and
    `on_episode` after every finished episode (for progress displays).
    """
    settings.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress_path = out / "eval_tasks.jsonl"
    fingerprint = settings.fingerprint(model_name)
    done = _load_progress(progress_path, fingerprint)
    if not progress_path.exists() or not progress_path.stat().st_size:
        append_jsonl(progress_path, {"settings": fingerprint})

    env_proto = make(settings.env, **settings.env_params)
    tasks = env_proto.make_tasks(settings.tasks, settings.task_seed)
    todo = [t for t in tasks if t.task_id not in done]
    if on_start is not None:
        on_start(len(tasks) * settings.samples, (len(tasks) - len(todo)) * settings.samples)

    engine = RolloutEngine(
        backend,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        max_batch=settings.max_batch,
        seed=settings.seed,
        system=playbook_system_prompt(settings.playbook),
    )
    session, started = uuid.uuid4().hex[:8], time.perf_counter()
    pending: dict[str, list[Episode]] = defaultdict(list)

    def finished(episode: Episode) -> None:
        pending[episode.task_id].append(episode)
        if on_episode is not None:
            on_episode(episode)
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
            "session": session,
            "elapsed_s": round(time.perf_counter() - started, 3),
        }
        append_jsonl(progress_path, record)
        done[record["task_id"]] = record

    lives = (
        engine.start(envs(settings.env, **settings.env_params), task, {"sample": j})
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
        "model": model_name,
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
        "prefill_tokens": backend.stats.prefill_tokens - prefill_before,
        "wall_s": round(sum(sessions.values()), 3),
    }
    write_json(out / "eval.json", result)
    return result


def _load_progress(path: Path, fingerprint: dict[str, Any]) -> dict[str, dict]:
    records = list(read_jsonl(path))
    if not records:
        return {}
    header = records[0].get("settings")
    if header != fingerprint:
        changed = sorted(k for k in set(fingerprint) | set(header or {}) if (header or {}).get(k) != fingerprint.get(k))
        raise LeafeError(
            f"{path.parent} holds a partial evaluation with different settings ({', '.join(changed)}); "
            f"use another --out directory or delete {path.name} to start over"
        )
    return {r["task_id"]: r for r in records[1:]}

