"""The ACE baseline (Agentic Context Engineering, arXiv 2510.04618; code ace-agent/ace and
ace-agent/ace-appworld): no weight update; a playbook of bullets in the system prompt, grown over the
training tasks and used, as it ends, on the held-out ones (ACE's offline mode).

Three roles, played in rounds of `tasks_per_round` training tasks:
- generator: the model plays the round's tasks with the playbook in its system prompt, every bullet
  a line `[ctx-00007] helpful=2 harmful=0 :: text` (ace-agent/ace's bullet line: an id and two
  counters), or `[ctx-00007] text` with `bullet_counters` off (ace-appworld's);
- reflector: the same model, at `reflect_temperature` (ACE: 0), reads each finished attempt with the
  env's feedback, is told its outcome and the ids of the bullets in play, tags those that helped or
  misled, and writes up to `bullets_per_reflection` new bullets, each of up to `bullet_chars`
  characters and as many lines as it likes (`leafe.prompts.ace_reflector_prompt`);
- curator: deterministic code, as ACE's own merge is. A tag moves only its bullet's counter (ACE's
  "counter layer"): a bullet nobody tagged keeps its counts whatever the outcome. New bullets get the
  next ids; one whose words overlap a bullet's by at least `similarity` merges into it. Over
  `max_lessons`, the bullets with the lowest helpful - harmful go; ties drop the fewer proposed, then
  the older, so a playbook that earns no tags at all keeps its newest bullets.

Where this departs from ACE (each with its reason, in docs/usage.md "ACE"): the generator does not
name the bullets it used (every method is played and evaluated in the same reply format), so every
bullet in the system prompt is in play and the reflector judges which mattered; the reflector writes
the new bullets itself (ACE's curator is a second LLM call that rephrases the reflection into ADD
operations); the playbook has no sections.

`playbook.json` is rewritten atomically after every round, so an interrupted run resumes from the
last finished round; `leafe eval --playbook FILE` puts its bullet lines in the system prompt.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leafe.envs import make
from leafe.errors import LeafeError
from leafe.files import read_json, write_json
from leafe.fingerprint import resume_fingerprint
from leafe.method import Job, MethodResult
from leafe.prompts import (
    SYSTEM_PROMPT,
    ace_reflector_prompt,
    bullet_id,
    bullet_line,
    parse_bullet_reflection,
    playbook_system_prompt,
)
from leafe.rollout import Live, RolloutEngine
from leafe.rundir import RUN_FORMAT, check_resume, recorded_format
from leafe.settings import ACESettings


@dataclass
class Bullet:
    id: str
    text: str
    helpful: int = 0  # times the reflector tagged it helpful in an attempt it was in play in
    harmful: int = 0
    proposed: int = 1  # times the reflector proposed it or a duplicate
    added_round: int = 0

    @property
    def score(self) -> int:
        return self.helpful - self.harmful

    def line(self, counters: bool = True) -> str:
        return bullet_line(self.id, self.helpful, self.harmful, self.text, counters)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def similarity(a: str, b: str) -> float:
    """Jaccard overlap of the two texts' lower-cased words."""
    x, y = _words(a), _words(b)
    return len(x & y) / len(x | y) if x | y else 1.0


@dataclass
class Playbook:
    bullets: list[Bullet] = field(default_factory=list)
    next_id: int = 1  # ids are never reused, so a dropped bullet's tags cannot land on a newer one

    def ids(self) -> list[str]:
        return [x.id for x in self.bullets]

    def lines(self, counters: bool = True) -> list[str]:
        return [x.line(counters) for x in self.bullets]

    def credit(self, tags: Mapping[str, str], in_play: Iterable[str]) -> dict[str, int]:
        """One reflection's tags: +1 helpful or +1 harmful to each tagged bullet that was in play in
        its attempt. Neutral tags, untagged bullets and ids not in play change nothing. Returns counts."""
        by_id, in_play = {x.id: x for x in self.bullets}, set(in_play)
        counts = {"helpful": 0, "harmful": 0, "unknown": 0}
        for identifier, tag in tags.items():
            bullet = by_id.get(identifier) if identifier in in_play else None
            if bullet is None:
                counts["unknown"] += 1
            elif tag == "helpful":
                bullet.helpful += 1
                counts["helpful"] += 1
            elif tag == "harmful":
                bullet.harmful += 1
                counts["harmful"] += 1
        return counts

    def curate(self, proposals: Iterable[str], round_index: int, max_bullets: int, threshold: float) -> dict[str, int]:
        """Merge proposals (deduped against the playbook and each other), then cap. Returns counts."""
        added = merged = 0
        for text in proposals:
            best = max(self.bullets, key=lambda x: similarity(x.text, text), default=None)
            if best is not None and similarity(best.text, text) >= threshold:
                best.proposed += 1
                merged += 1
            else:
                self.bullets.append(Bullet(bullet_id(self.next_id), text, added_round=round_index))
                self.next_id += 1
                added += 1
        dropped = max(0, len(self.bullets) - max_bullets)
        if dropped:
            # The bullets' order is their ids' order, so the position breaks the last tie: the older goes.
            ranked = sorted(enumerate(self.bullets), key=lambda p: (p[1].score, p[1].proposed, p[1].added_round, p[0]),
                            reverse=True)
            keep = {i for i, _ in ranked[:max_bullets]}
            self.bullets = [x for i, x in enumerate(self.bullets) if i in keep]  # the playbook keeps its order
        return {"added": added, "merged": merged, "dropped": dropped}

    def to_dict(self) -> dict[str, Any]:
        return {"next_id": self.next_id, "lessons": [asdict(x) for x in self.bullets]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Playbook:
        bullets = [Bullet(**x) for x in data.get("lessons", [])]
        return cls(bullets, int(data.get("next_id") or len(bullets) + 1))


def load_playbook(path: str | Path) -> list[str]:
    """The bullet lines of a playbook.json, for the system prompt; a clear error when it is not one, or
    when `leafe train ace` wrote it in another run format (`leafe.rundir.RUN_FORMAT`)."""
    path = Path(path)
    if not path.exists():
        raise LeafeError(f"--playbook {path} does not exist; leafe train ace writes DIR/playbook.json")
    try:
        data = read_json(path)
        if isinstance(data.get("settings"), dict) and (found := recorded_format(data["settings"])) != RUN_FORMAT:
            raise LeafeError(f"--playbook {path} was written by leafe run format {found}, and this leafe reads format "
                             f"{RUN_FORMAT}: build it again with leafe train ace --out DIR")
        # Rendered as the playbook was trained with (a hand-made one, without settings: ACE's line).
        counters = data.get("settings", {}).get("bullet_counters", True)
        return Playbook.from_dict(data).lines(counters)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise LeafeError(f"--playbook {path} is not a playbook written by leafe train ace ({exc})") from None


def reflect(engine: RolloutEngine, lives: list[Live], in_play: list[str], settings: ACESettings) -> list[str | None]:
    """The reflector's reply on each attempt; None where the attempt left no room in the model's
    context for a reflection (counted, never sent: the backend would refuse the prompt)."""
    asks = [ace_reflector_prompt(live.episode.success, live.episode.reward, in_play, settings.bullets_per_reflection)
            for live in lives]
    prompts = [engine.recorder.reflection_prompt(live, ask).prompt_ids() for live, ask in zip(lives, asks)]
    fits = [i for i, p in enumerate(prompts) if len(p) + settings.reflection_tokens <= engine.backend.max_context]
    replies: list[str | None] = [None] * len(lives)
    if fits:
        generated = engine.generate([prompts[i] for i in fits], max_new_tokens=settings.reflection_tokens,
                                    temperature=settings.reflect_temperature)
        for i, (reply,) in zip(fits, generated):
            replies[i] = reply.text
    return replies


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
        in_play = playbook.ids()  # every bullet of the system prompt the round is played with
        engine = RolloutEngine(backend, temperature=settings.temperature, top_p=settings.top_p, max_new_tokens=settings.max_new_tokens,
                               seed=settings.seed * 100_003 + round_index,
                               system=playbook_system_prompt(playbook.lines(settings.bullet_counters), SYSTEM_PROMPT),
                               date_string=settings.date_string)
        lives = [engine.start(envs(settings.env, **settings.env_params), task) for task in schedule[round_index]]
        episodes = engine.run(lives)  # generator
        replies = reflect(engine, lives, in_play, settings)  # reflector
        tags = {"helpful": 0, "harmful": 0, "unknown": 0}
        proposals, over_limit = [], 0
        for reply in replies:
            if reply is None:
                continue
            parsed = parse_bullet_reflection(reply, settings.bullet_chars)
            for key, n in playbook.credit(parsed.tags, in_play).items():
                tags[key] += n
            proposals += parsed.bullets[: settings.bullets_per_reflection]
            over_limit += max(0, len(parsed.bullets) - settings.bullets_per_reflection)
        counts = playbook.curate(proposals, round_index, settings.max_lessons, settings.similarity)  # curator
        record = {"round": round_index + 1, "episodes": len(episodes), "success": sum(e.success for e in episodes),
                  "reflections": sum(r is not None for r in replies), "no_room": sum(r is None for r in replies),
                  "tagged_helpful": tags["helpful"], "tagged_harmful": tags["harmful"], "unknown_tags": tags["unknown"],
                  "proposals": len(proposals), "over_limit": over_limit, **counts,
                  "lessons": len(playbook.bullets), "env_steps": engine.counters.env_steps,
                  "generated_tokens": backend.stats.generated_tokens - before,
                  "wall_s": round(time.perf_counter() - started, 3)}
        state = state | playbook.to_dict() | {"round": round_index + 1, "rounds": state["rounds"] + [record]}
        write_json(path, state)
        job.tracker.log(record, step=record["round"])
        job.progress.advance(status=f"{record['lessons']} bullets")
    rounds = state["rounds"]
    summary = {
        "method": "ace",
        "model": str(model),
        "settings": asdict(settings),
        "data": {"tasks": len(tasks), "rounds": len(rounds), "episodes": sum(r["episodes"] for r in rounds),
                 "reflections": sum(r["reflections"] for r in rounds),
                 "tagged_helpful": sum(r["tagged_helpful"] for r in rounds),
                 "tagged_harmful": sum(r["tagged_harmful"] for r in rounds),
                 "proposals": sum(r["proposals"] for r in rounds), "lessons": len(playbook.bullets)},
        "cost": {"env_steps": sum(r["env_steps"] for r in rounds),
                 "generated_tokens": sum(r["generated_tokens"] for r in rounds),
                 "wall_s": round(sum(r["wall_s"] for r in rounds), 2)},
        "playbook": str(path),
    }
    write_json(out / "train.json", summary)
    return MethodResult("ace", str(model), summary["settings"], {**summary["data"], "playbook": str(path)},
                        summary["cost"])
