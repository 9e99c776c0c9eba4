"""The ACE baseline (agentic context engineering): no weight update; a playbook of short lessons in
the system prompt, grown over the training tasks.

Three roles, played in rounds over the training tasks:
- generator: the model plays a round of tasks with the current playbook in its system prompt;
- reflector: the same model reads each finished attempt with its feedback and writes one lesson
  (`ACE_REFLECTOR_PROMPT`; a reply without a 'Lesson:' line proposes nothing, and is counted);
- curator: merges the proposals into the playbook. As in ACE, the merge itself is deterministic
  code: a proposal whose words overlap an existing lesson's by at least `similarity` (Jaccard over
  lower-cased words) is a duplicate and only bumps that lesson's `proposed` count; otherwise it is
  added. Every lesson in the context of an attempt is credited by the outcome: helpful +1 when it
  succeeded, harmful +1 when it failed. Over `max_lessons`, the lessons with the lowest
  helpful - harmful (then fewest proposals, then oldest) are dropped.
ACE's curator is also an LLM that phrases the delta; here the reflector's own line is the delta,
because the attribution and merge rules, not the phrasing, are what a small model can carry.

`playbook.json` is rewritten atomically after every round, so an interrupted run resumes from the
last finished round; `leafe eval --playbook FILE` puts its lessons in the system prompt.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leafe.envs import make
from leafe.errors import LeafeError
from leafe.files import read_json, write_json
from leafe.fingerprint import resume_fingerprint
from leafe.method import Job, MethodResult
from leafe.prompts import ACE_REFLECTOR_PROMPT, SYSTEM_PROMPT, parse_lesson, playbook_system_prompt
from leafe.rollout import RolloutEngine
from leafe.rundir import check_resume
from leafe.settings import ACESettings


@dataclass
class Lesson:
    text: str
    helpful: int = 0
    harmful: int = 0
    proposed: int = 1  # times the reflector proposed it or a near duplicate
    added_round: int = 0

    @property
    def score(self) -> int:
        return self.helpful - self.harmful


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def similarity(a: str, b: str) -> float:
    """Jaccard overlap of the two texts' lower-cased words."""
    x, y = _words(a), _words(b)
    return len(x & y) / len(x | y) if x | y else 1.0


@dataclass
class Playbook:
    lessons: list[Lesson] = field(default_factory=list)

    def texts(self) -> list[str]:
        return [x.text for x in self.lessons]

    def credit(self, successes: Sequence[bool]) -> None:
        """Outcome attribution: every lesson in the context of an attempt shares its result."""
        won = sum(1 for s in successes if s)
        for lesson in self.lessons:
            lesson.helpful += won
            lesson.harmful += len(successes) - won

    def curate(self, proposals: Sequence[str], round_index: int, max_lessons: int, threshold: float) -> dict[str, int]:
        """Merge proposals (dedupe against the playbook and each other), then cap. Returns counts."""
        added = merged = 0
        for text in proposals:
            best = max(self.lessons, key=lambda x: similarity(x.text, text), default=None)
            if best is not None and similarity(best.text, text) >= threshold:
                best.proposed += 1
                merged += 1
            else:
                self.lessons.append(Lesson(text, added_round=round_index))
                added += 1
        dropped = max(0, len(self.lessons) - max_lessons)
        if dropped:
            ranked = sorted(self.lessons, key=lambda x: (x.score, x.proposed, x.added_round), reverse=True)
            keep = {id(x) for x in ranked[:max_lessons]}
            self.lessons = [x for x in self.lessons if id(x) in keep]  # playbook order stays insertion order
        return {"added": added, "merged": merged, "dropped": dropped}

    def to_dict(self) -> dict[str, Any]:
        return {"lessons": [asdict(x) for x in self.lessons]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Playbook:
        return cls([Lesson(**x) for x in data.get("lessons", [])])


def load_playbook(path: str | Path) -> list[str]:
    """The lesson texts of a playbook.json, for the system prompt; a clear error when it is not one."""
    path = Path(path)
    if not path.exists():
        raise LeafeError(f"--playbook {path} does not exist; leafe train ace writes DIR/playbook.json")
    try:
        return Playbook.from_dict(read_json(path)).texts()
    except (ValueError, TypeError, KeyError) as exc:
        raise LeafeError(f"--playbook {path} is not a playbook written by leafe train ace ({exc})") from None


def train_ace(job: Job, settings: ACESettings) -> MethodResult:
    """Build `job.out/playbook.json` over the training tasks, playing with `job.backend`; resumes from
    the last finished round. ACE trains no weights: the result's model is `job.model` (used with the
    playbook), its data the round counts and the playbook's path."""
    settings.validate()
    backend, model, envs, out = job.backend, job.model, job.envs, job.out
    if backend is None:
        raise LeafeError("ACE samples: give it a backend (Job.backend)")
    path = out / "playbook.json"
    tasks = make(settings.env, **settings.env_params).make_tasks(settings.tasks, settings.task_seed)
    schedule = [tasks[i : i + settings.tasks_per_round] for _ in range(settings.epochs)
                for i in range(0, len(tasks), settings.tasks_per_round)]
    fingerprint = resume_fingerprint(settings, str(model))
    state = {"settings": fingerprint, "round": 0, "rounds": [], "lessons": []}
    if path.exists():
        previous = read_json(path)
        check_resume(previous.get("settings") or {}, fingerprint, out, "an ACE playbook")
        state = previous
    job.progress.start(len(schedule), state["round"])
    playbook = Playbook.from_dict(state)
    for round_index in range(state["round"], len(schedule)):
        started = time.perf_counter()
        before = backend.stats.generated_tokens
        engine = RolloutEngine(backend, temperature=settings.temperature, top_p=settings.top_p, max_new_tokens=settings.max_new_tokens,
                               seed=settings.seed * 100_003 + round_index,
                               system=playbook_system_prompt(playbook.texts(), SYSTEM_PROMPT),
                               date_string=settings.date_string)
        lives = [engine.start(envs(settings.env, **settings.env_params), task) for task in schedule[round_index]]
        episodes = engine.run(lives)  # generator
        prompts = [engine.recorder.reflection_prompt(live, ACE_REFLECTOR_PROMPT).prompt_ids() for live in lives]
        replies = engine.generate(prompts, max_new_tokens=settings.reflection_tokens)  # reflector
        proposals = [lesson for (c,) in replies if (lesson := parse_lesson(c.text)) is not None]
        playbook.credit([live.episode.success for live in lives])
        counts = playbook.curate(proposals, round_index, settings.max_lessons, settings.similarity)  # curator
        record = {"round": round_index + 1, "episodes": len(episodes), "success": sum(e.success for e in episodes),
                  "reflections": len(replies), "proposals": len(proposals), **counts,
                  "lessons": len(playbook.lessons), "env_steps": engine.counters.env_steps,
                  "generated_tokens": backend.stats.generated_tokens - before,
                  "wall_s": round(time.perf_counter() - started, 3)}
        state = state | playbook.to_dict() | {"round": round_index + 1, "rounds": state["rounds"] + [record]}
        write_json(path, state)
        job.progress.advance(status=f"{record['lessons']} lessons")
    rounds = state["rounds"]
    summary = {
        "method": "ace",
        "model": str(model),
        "settings": asdict(settings),
        "data": {"tasks": len(tasks), "rounds": len(rounds), "episodes": sum(r["episodes"] for r in rounds),
                 "reflections": sum(r["reflections"] for r in rounds),
                 "proposals": sum(r["proposals"] for r in rounds), "lessons": len(playbook.lessons)},
        "cost": {"env_steps": sum(r["env_steps"] for r in rounds),
                 "generated_tokens": sum(r["generated_tokens"] for r in rounds),
                 "wall_s": round(sum(r["wall_s"] for r in rounds), 2)},
        "playbook": str(path),
    }
    write_json(out / "train.json", summary)
    return MethodResult("ace", str(model), summary["settings"], {**summary["data"], "playbook": str(path)},
                        summary["cost"])
