"""ACE: curator deduplication, cap and credit; rounds that resume; the playbook in eval's system prompt."""

from __future__ import annotations

import json

import pytest
from helpers import ScriptedBackend

from leafe.errors import LeafeError
from leafe.method import Job
from leafe.methods.ace import Lesson, Playbook, load_playbook, similarity, train_ace
from leafe.prompts import SYSTEM_PROMPT, parse_lesson, playbook_system_prompt
from leafe.settings import ACESettings


def test_similarity_is_word_jaccard():
    assert similarity("Push the box up", "push the box UP!") == 1.0
    assert similarity("push box", "push wall") == pytest.approx(1 / 3)


def test_curator_dedupes_against_playbook_and_batch():
    book = Playbook([Lesson("Do not push a box into a corner.")])
    counts = book.curate(["do not push a box into a corner", "Check the goal before pushing.",
                          "check the goal before pushing!"], round_index=1, max_lessons=10, threshold=0.6)
    assert counts == {"added": 1, "merged": 2, "dropped": 0}
    assert book.texts() == ["Do not push a box into a corner.", "Check the goal before pushing."]
    assert [x.proposed for x in book.lessons] == [2, 2]


def test_curator_cap_drops_the_worst_scored():
    book = Playbook([Lesson("alpha one", helpful=3), Lesson("beta two", harmful=2), Lesson("gamma three", helpful=1)])
    counts = book.curate(["delta four"], round_index=2, max_lessons=3, threshold=0.6)
    assert counts["dropped"] == 1
    assert book.texts() == ["alpha one", "gamma three", "delta four"]  # beta (score -2) goes; order kept


def test_credit_follows_outcomes():
    book = Playbook([Lesson("a"), Lesson("b")])
    book.credit([True, False, False])
    assert [(x.helpful, x.harmful) for x in book.lessons] == [(1, 2), (1, 2)]


def test_parse_lesson_variants():
    assert parse_lesson("Lesson: keep the box off the walls.") == "keep the box off the walls."
    assert parse_lesson("Step: 2\nExperience: go up first") == "go up first"
    assert parse_lesson("no idea") is None
    assert parse_lesson("Lesson: .") is None
    # Saying there is nothing to learn is not a lesson (a playbook once curated "none" as one).
    for empty in ("Lesson: none", "Lesson: None.", "Experience: N/A", "Lesson: nothing", "Lesson: *No lesson.*"):
        assert parse_lesson(empty) is None, empty
    assert parse_lesson("Lesson: none of the boxes may touch a wall.") == "none of the boxes may touch a wall."
    assert parse_lesson("Lesson:\n  push from behind\nStep: 3") == "push from behind"  # one line only


def test_playbook_goes_into_the_system_prompt():
    assert playbook_system_prompt([]) == SYSTEM_PROMPT
    prompt = playbook_system_prompt(["one", "two"])
    assert prompt.startswith(SYSTEM_PROMPT) and prompt.endswith("- one\n- two")


def test_train_ace_builds_and_resumes(tiny_tokenizer, tmp_path):
    calls = {"n": 0}

    def policy(text: str, i: int) -> str:
        if "general lesson" in text:
            calls["n"] += 1
            return f"Lesson: lesson number {calls['n']} about boxes {'x' * calls['n']}."
        return "Thought: go.\nAction: up"

    backend = ScriptedBackend(tiny_tokenizer, policy)
    settings = ACESettings(tasks=6, task_seed=40, tasks_per_round=2, max_lessons=4, similarity=0.9,
                           env_params={"max_steps": 3})
    summary = train_ace(Job("scripted", tmp_path, backend=backend), settings)
    saved = json.loads((tmp_path / "playbook.json").read_text())
    assert saved["round"] == 3 and len(saved["rounds"]) == 3
    assert summary.method == "ace" and summary.data["playbook"] == str(tmp_path / "playbook.json")
    assert summary.data["proposals"] == 6 and len(saved["lessons"]) == 4  # capped
    assert summary.cost["env_steps"] == 6 * 3
    assert load_playbook(tmp_path / "playbook.json") == [x["text"] for x in saved["lessons"]]
    # The generator saw the lessons of earlier rounds in its system prompt.
    seen = []
    backend.policy = lambda text, i: (seen.append(text), policy(text, i))[1]
    settings.epochs = 2
    train_ace(Job("scripted", tmp_path, backend=backend), settings)  # resumes at round 3 of 6
    assert json.loads((tmp_path / "playbook.json").read_text())["round"] == 6
    assert any("Playbook (lessons from earlier tasks)" in t for t in seen)
    with pytest.raises(LeafeError, match="different settings"):
        train_ace(Job("scripted", tmp_path, backend=backend), ACESettings(tasks=5))


def test_load_playbook_errors(tmp_path):
    with pytest.raises(LeafeError, match="does not exist"):
        load_playbook(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"lessons": [{"nope": 1}]}')
    with pytest.raises(LeafeError, match="not a playbook"):
        load_playbook(tmp_path / "bad.json")
