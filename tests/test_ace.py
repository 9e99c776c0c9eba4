"""ACE: bullets with ids, credit by the reflector's tags, a cap by that credit, the reflector's prompt and
parser; rounds that resume; the playbook in eval's system prompt."""

from __future__ import annotations

import json
import re

import pytest
from helpers import ScriptedBackend, solver_reply

from leafe.errors import LeafeError
from leafe.method import Job
from leafe.methods.ace import Bullet, Playbook, load_playbook, similarity, train_ace
from leafe.prompts import SYSTEM_PROMPT, bullet_line, parse_bullet_reflection, playbook_system_prompt
from leafe.rundir import RUN_FORMAT
from leafe.settings import ACESettings

REFLECTOR_ASKS = "Bullet: <lesson>"  # the last line of every reflector prompt


def in_play(prompt_text: str) -> list[str]:
    """The bullet ids a reflector prompt names as in play."""
    found = re.search(r"bullets in play were ([^.]*)\.", prompt_text)
    return found.group(1).split(", ") if found else []


def test_similarity_is_word_jaccard():
    assert similarity("Push the box up", "push the box UP!") == 1.0
    assert similarity("push box", "push wall") == pytest.approx(1 / 3)


def test_curator_gives_new_bullets_the_next_ids_and_dedupes_against_playbook_and_batch():
    book = Playbook([Bullet("ctx-00001", "Do not push a box into a corner.")], next_id=2)
    counts = book.curate(["do not push a box into a corner", "Check the goal before pushing.",
                          "check the goal before pushing!"], round_index=1, max_bullets=10, threshold=1.0)
    assert counts == {"added": 1, "merged": 2, "dropped": 0}
    assert book.ids() == ["ctx-00001", "ctx-00002"]
    assert [x.proposed for x in book.bullets] == [2, 2]
    # At the default threshold (1: ACE's embedding dedup is off) a rephrasing is a bullet of its own.
    book.curate(["Check the goal first, then push."], round_index=2, max_bullets=10, threshold=1.0)
    assert len(book.bullets) == 3


def test_cap_drops_the_lowest_credit_and_ties_drop_the_fewer_proposed_then_the_older():
    book = Playbook([Bullet("ctx-00001", "alpha", helpful=3), Bullet("ctx-00002", "beta", harmful=2),
                     Bullet("ctx-00003", "gamma"), Bullet("ctx-00004", "delta", proposed=2),
                     Bullet("ctx-00005", "epsilon", added_round=1)], next_id=6)
    counts = book.curate(["zeta"], round_index=1, max_bullets=4, threshold=1.0)
    # beta (-2) goes first; of the five at 0 or more, gamma (0, proposed once, round 0) is the older tie.
    assert counts == {"added": 1, "merged": 0, "dropped": 2}
    assert book.ids() == ["ctx-00001", "ctx-00004", "ctx-00005", "ctx-00006"]  # the playbook keeps its order
    book.curate(["eta"], round_index=2, max_bullets=4, threshold=1.0)
    assert book.ids()[-1] == "ctx-00007"  # a dropped bullet's id is never given again
    assert "ctx-00005" not in book.ids()  # epsilon and zeta tie at round 1: epsilon, the older, went


def test_credit_moves_only_the_tagged_bullets_that_were_in_play():
    book = Playbook([Bullet("ctx-00001", "a"), Bullet("ctx-00002", "b"), Bullet("ctx-00003", "c")], next_id=4)
    counts = book.credit({"ctx-00001": "helpful", "ctx-00002": "harmful", "ctx-00003": "neutral",
                          "ctx-00009": "helpful"}, in_play=["ctx-00001", "ctx-00002", "ctx-00003"])
    assert counts == {"helpful": 1, "harmful": 1, "unknown": 1}
    assert [(x.helpful, x.harmful) for x in book.bullets] == [(1, 0), (0, 1), (0, 0)]
    book.credit({"ctx-00003": "helpful"}, in_play=["ctx-00001"])  # not in that attempt's context
    assert book.bullets[2].helpful == 0


def test_parse_bullet_reflection_reads_tags_and_multiline_bullets():
    reply = ("The box went into a corner at step 3.\n"
             "Helpful: ctx-00001, [ctx-3]\nHarmful: ctx-00002\n[ctx-00004] neutral\n"
             "[ctx-00005] helpful=0 harmful=0 :: an echoed playbook line is no tag\n"
             "Bullet: Before pushing a box, look at the cell behind it:\n"
             "   a wall or a box there   means the push fails.\n\n"
             "Bullet 2: none\n**Bullet 3:** Keep boxes off the walls.\nStep: 3\n")
    parsed = parse_bullet_reflection(reply, max_chars=1000)
    assert parsed.tags == {"ctx-00001": "helpful", "ctx-00003": "helpful", "ctx-00002": "harmful", "ctx-00004": "neutral"}
    assert parsed.bullets == ["Before pushing a box, look at the cell behind it:\na wall or a box there means the push fails.",
                              "Keep boxes off the walls."]
    # The words small models reflect in ('Experience:' is the embedded agent's) still give a bullet.
    assert parse_bullet_reflection("Step: 2\nExperience: go up first", 1000).bullets == ["go up first"]
    assert parse_bullet_reflection("Lesson: keep the box off the walls.", 1000).bullets == ["keep the box off the walls."]
    for empty in ("no idea", "Bullet: .", "Bullet: None.", "Lesson: *No lesson.*", "Experience: N/A"):
        assert parse_bullet_reflection(empty, 1000).bullets == [], empty
    assert parse_bullet_reflection("Bullet: " + "x" * 50, max_chars=20).bullets == ["x" * 20]


def test_playbook_goes_into_the_system_prompt_as_bullet_lines():
    assert playbook_system_prompt([]) == SYSTEM_PROMPT
    book = Playbook([Bullet("ctx-00002", "one\ntwo", helpful=3)])
    prompt = playbook_system_prompt(book.lines())
    assert prompt.startswith(SYSTEM_PROMPT)
    assert prompt.endswith("[ctx-00002] helpful=3 harmful=0 :: one\n  two")
    assert book.lines() == [bullet_line("ctx-00002", 3, 0, "one\ntwo")]
    assert book.lines(counters=False) == ["[ctx-00002] one\n  two"]  # ace-appworld's line


def test_a_playbook_without_counters_is_played_and_evaluated_without_them(tiny_tokenizer, tmp_path):
    seen = []

    def policy(text: str, i: int) -> str:
        seen.append(text)
        return "Bullet: push from behind" if REFLECTOR_ASKS in text else "Thought: go.\nAction: up"

    settings = ACESettings(tasks=2, task_seed=40, tasks_per_round=1, bullet_counters=False,
                           env_params={"max_steps": 2})
    train_ace(Job("scripted", tmp_path, backend=ScriptedBackend(tiny_tokenizer, policy)), settings)
    # Round 2's generator saw round 1's bullet as `[id] text`, and so does the evaluation.
    assert any("Playbook (bullets learnt on earlier tasks):\n[ctx-00001] push from behind" in t for t in seen)
    assert not any("helpful=" in t for t in seen)
    assert load_playbook(tmp_path / "playbook.json") == ["[ctx-00001] push from behind"]


class RecordingBackend(ScriptedBackend):
    """A scripted backend that also records each reflector call's prompt and temperature."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reflections: list[tuple[str, float]] = []

    def generate(self, prompts, sampling):
        for prompt in prompts:
            text = self.tokenizer.decode(list(prompt), skip_special_tokens=False)
            if REFLECTOR_ASKS in text:
                self.reflections.append((text.rsplit(SYSTEM_PROMPT, 1)[1], sampling.temperature))
        return super().generate(prompts, sampling)


def test_train_ace_builds_and_resumes(tiny_tokenizer, tmp_path):
    calls = {"n": 0}

    def policy(text: str, i: int) -> str:
        if REFLECTOR_ASKS in text:
            calls["n"] += 1
            tags = f"Harmful: {in_play(text)[0]}\n" if in_play(text) else ""
            return f"{tags}Bullet: lesson number {calls['n']} about boxes {'x' * calls['n']}."
        return "Thought: go.\nAction: up"

    backend = RecordingBackend(tiny_tokenizer, policy)
    settings = ACESettings(tasks=6, task_seed=40, tasks_per_round=2, max_lessons=4, env_params={"max_steps": 3})
    summary = train_ace(Job("scripted", tmp_path, backend=backend), settings)
    saved = json.loads((tmp_path / "playbook.json").read_text())
    assert saved["round"] == 3 and len(saved["rounds"]) == 3
    assert summary.method == "ace" and summary.data["playbook"] == str(tmp_path / "playbook.json")
    assert summary.data["proposals"] == 6 and len(saved["lessons"]) == 4  # capped
    assert summary.data["tagged_harmful"] == 4 and summary.data["tagged_helpful"] == 0  # rounds 2 and 3, 2 each
    assert summary.cost["env_steps"] == 6 * 3
    assert load_playbook(tmp_path / "playbook.json") == [
        bullet_line(x["id"], x["helpful"], x["harmful"], x["text"]) for x in saved["lessons"]]
    assert saved["settings"]["format"] == RUN_FORMAT  # the run format a rerun must match to resume
    # The reflector is greedy by default, told the outcome and which bullets were in play.
    assert {t for _, t in backend.reflections} == {0.0}
    assert all("This attempt failed (reward 0)" in text for text, _ in backend.reflections)
    assert [in_play(text) for text, _ in backend.reflections[2:4]] == [["ctx-00001", "ctx-00002"]] * 2
    # The generator saw the bullets of earlier rounds, with their ids, in its system prompt.
    seen = []
    backend.policy = lambda text, i: (seen.append(text), policy(text, i))[1]
    settings.epochs = 2
    train_ace(Job("scripted", tmp_path, backend=backend), settings)  # resumes at round 3 of 6
    assert json.loads((tmp_path / "playbook.json").read_text())["round"] == 6
    assert any("Playbook (bullets learnt on earlier tasks):\n[ctx-0000" in t for t in seen)
    with pytest.raises(LeafeError, match="different settings"):
        train_ace(Job("scripted", tmp_path, backend=backend), ACESettings(tasks=5))


def test_cap_keeps_the_bullets_the_reflector_credits_not_the_oldest(tiny_tokenizer, tmp_path):
    """Every attempt is won (the solver plays); each reflector calls the newest bullet in play helpful and
    the older ones harmful. Crediting every bullet with every outcome (the rule before) kept the first
    round's two bullets for good and dropped each later one on arrival."""
    written = {"n": 0}

    def policy(text: str, i: int) -> str:
        if REFLECTOR_ASKS in text:
            written["n"] += 1
            ids = in_play(text)
            tags = f"Helpful: {ids[-1]}\nHarmful: {', '.join(ids[:-1])}\n" if ids else ""
            return f"{tags}Bullet: tip {written['n']} {'y' * written['n']}"
        return solver_reply(text)

    settings = ACESettings(tasks=8, task_seed=70, tasks_per_round=2, max_lessons=2)
    train_ace(Job("scripted", tmp_path, backend=ScriptedBackend(tiny_tokenizer, policy)), settings)
    saved = json.loads((tmp_path / "playbook.json").read_text())
    assert [r["success"] for r in saved["rounds"]] == [2, 2, 2, 2]
    kept = {x["id"]: (x["helpful"], x["harmful"]) for x in saved["lessons"]}
    # Round 4 played with ctx-00004 and ctx-00006: 6 was called helpful twice, 4 harmful twice (it had
    # earned +2 in round 3: at 0 it ties with round 4's new bullets, and the older tie goes).
    assert kept == {"ctx-00006": (2, 0), "ctx-00008": (0, 0)}
    assert saved["next_id"] == 9


def test_a_reflection_with_no_room_in_the_context_is_skipped_and_counted(tiny_tokenizer, tmp_path):
    backend = RecordingBackend(tiny_tokenizer, lambda text, i: "Thought: go.\nAction: up", max_context=100_000)
    settings = ACESettings(tasks=2, task_seed=40, tasks_per_round=2, reflection_tokens=100_000,
                           env_params={"max_steps": 2})
    train_ace(Job("scripted", tmp_path, backend=backend), settings)
    (record,) = json.loads((tmp_path / "playbook.json").read_text())["rounds"]
    assert (record["reflections"], record["no_room"], record["lessons"]) == (0, 2, 0)
    assert backend.reflections == []


def test_load_playbook_errors_and_playbooks_of_another_run_format(tmp_path):
    with pytest.raises(LeafeError, match="does not exist"):
        load_playbook(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"lessons": [{"nope": 1}]}')
    with pytest.raises(LeafeError, match="not a playbook"):
        load_playbook(tmp_path / "bad.json")
    (tmp_path / "no-ids.json").write_text('{"lessons": [{"text": "push from behind", "helpful": 2}]}')
    with pytest.raises(LeafeError, match="not a playbook"):  # bullets have ids
        load_playbook(tmp_path / "no-ids.json")
    lessons = [{"id": "ctx-00001", "text": "push from behind", "helpful": 2}]
    (tmp_path / "mine.json").write_text(json.dumps({"lessons": lessons}))  # made by hand: no settings record
    assert load_playbook(tmp_path / "mine.json") == ["[ctx-00001] helpful=2 harmful=0 :: push from behind"]
    # One `leafe train ace` wrote in another run format (0: before formats were recorded) is refused.
    for found, settings in ((0, {"tasks": 4}), (RUN_FORMAT + 1, {"tasks": 4, "format": RUN_FORMAT + 1})):
        (tmp_path / "old.json").write_text(json.dumps({"settings": settings, "lessons": lessons}))
        with pytest.raises(LeafeError) as refused:
            load_playbook(tmp_path / "old.json")
        assert str(refused.value) == (f"--playbook {tmp_path / 'old.json'} was written by leafe run format {found}, "
                                      f"and this leafe reads format {RUN_FORMAT}: build it again with leafe train ace "
                                      f"--out DIR")
