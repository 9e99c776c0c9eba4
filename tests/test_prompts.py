"""Parsing the agent's replies and reflections."""

import pytest

from leafe.prompts import Reflection, parse_action, parse_reflection


@pytest.mark.parametrize(
    "reply, action",
    [
        ("Thought: the box is left.\nAction: left", "left"),
        ("Thought: x\naction:   UP  ", "UP"),
        ("**Action:** `down`", "down"),
        ("Action: up\nThought: no wait\nAction: right", "right"),  # the last Action line wins
        ("I think I should go\nup", "up"),  # no Action line: the last line
        ("", ""),
    ],
)
def test_parse_action(reply, action):
    assert parse_action(reply) == action


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Step: 3\nExperience: pushed the box into a corner; go around it first.",
         Reflection(3, "pushed the box into a corner; go around it first.")),
        ("**Step** 2\n**Experience**: move up before pushing right",
         Reflection(2, "move up before pushing right")),
        ("The mistake was at step 0.\nLesson - never push the box against the wall",
         Reflection(0, "never push the box against the wall")),
        ("Step: 4\nExperience:\n  multi\n  line  ", Reflection(4, "multi line")),
        ("Step: none\nExperience: Nothing is lost yet.", Reflection(None, "Nothing is lost yet.")),
    ],
)
def test_parse_reflection_accepts_variants(reply, expected):
    assert parse_reflection(reply) == expected


@pytest.mark.parametrize("reply", ["Experience: do better", "Step: 2", "Step: x\nExperience: y", "Step: 1\nExperience:  ",
                                   "Step: 3 st Experience:."])
def test_parse_reflection_rejects_incomplete_replies(reply):
    assert parse_reflection(reply) is None
