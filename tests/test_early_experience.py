"""Early Experience: expert states, alternatives executed from a copy, IWM rows, the SR filter."""

from __future__ import annotations

import re

import pytest
from helpers import ScriptedBackend

from leafe.envs import make
from leafe.envs.base import replay
from leafe.method import Job
from leafe.methods.early_experience import (
    EarlyExperienceSettings,
    demonstrations,
    iwm_row,
    sample_alternatives,
    self_reflection_rows,
    train_early_experience,
)
from leafe.prompts import WORLD_MODEL_PROMPT, observation_message, parse_action
from leafe.rollout import RolloutEngine
from leafe.settings import SFTSettings

EXPERT = re.compile(r"An expert chose '(\w+)'")


def policy(text: str, i: int) -> str:
    """Alternatives: up, left, down (sample i); rationales: agree with the expert except when it says 'right'."""
    chosen = EXPERT.findall(text)
    if chosen:
        expert = chosen[-1]
        conclusion = "left" if expert == "right" else expert
        return f"Thought: {expert} moves the box toward the goal.\nAction: {conclusion}"
    return f"Thought: try.\nAction: {['up', 'left', 'down'][i % 3]}"


def labelled_text(row, tokenizer) -> str:
    return tokenizer.decode([t for t in row.labels if t != -100], skip_special_tokens=True)


@pytest.fixture()
def collected(tiny_tokenizer):
    backend = ScriptedBackend(tiny_tokenizer, policy)
    engine = RolloutEngine(backend, max_new_tokens=32)
    tasks = make("sokoban").make_tasks(3, 40)
    states, expert_rows, missing = demonstrations(engine, "sokoban", {}, tasks)
    settings = EarlyExperienceSettings(alternatives=3)
    alternatives, same = sample_alternatives(engine, states, settings)
    return engine, tasks, states, expert_rows, missing, alternatives, same, settings


def test_expert_states_follow_the_solver(collected, tiny_tokenizer):
    engine, tasks, states, expert_rows, missing, *_ = collected
    env = make("sokoban")
    plans = [env.expert_actions(t) for t in tasks]
    assert missing == 0 and len(states) == sum(len(p) for p in plans) and len(expert_rows) == 3
    assert [s.expert_action for s in states[: len(plans[0])]] == plans[0]
    # The imitation row trains exactly the expert's replies, in order.
    text = labelled_text(expert_rows[0], tiny_tokenizer)
    assert re.findall(r"Action: (up|down|left|right)", text) == plans[0]
    # ... each voiced as the embedded agent voices an optimal move: the plan, then the move.
    thoughts = re.findall(r"Thought: (.*)\n", text)
    assert len(thoughts) == len(plans[0])
    assert all(re.fullmatch(r"push \w+ from \(\d+,\d+\); at \(\d+,\d+\), go \w+\.", t) for t in thoughts)
    assert [t.rsplit(" ", 1)[1] for t in thoughts] == [f"{a}." for a in plans[0]]


def test_the_env_expert_speaks_with_the_bootstrap_experts_voice():
    # Early Experience's expert rows must read like the agent's own training data (synthetic.thought),
    # or the imitation stage teaches another phrasing (a bare "go X." made the plan agent stop planning).
    from leafe.envs.sokoban import move
    from leafe.envs.sokoban.oracle import Expert, thought

    task = make("sokoban").make_tasks(1, 7)[0]
    env = make("sokoban")
    env.reset(task)
    expert = Expert.of(task, 15, plans=True)
    state = expert.start
    for action in env.expert_actions(task)[:6]:
        assert env.expert_thought(action) == thought(expert, state, action)
        assert env.expert_thought(action).startswith("push ")
        wrong = next(a for a in ("up", "down", "left", "right") if a not in expert.optimal(state))
        assert env.expert_thought(wrong) == f"go {wrong}."
        env.step(action)
        state = move(expert.room, state, action)[0]


def test_alternatives_are_executed_from_the_expert_state(collected):
    engine, tasks, states, _, _, alternatives, same, _ = collected
    assert len(alternatives) + same == 3 * len(states)
    assert same == sum(1 for s in states if s.expert_action in ("up", "left", "down"))
    assert all(a.action != a.state.expert_action for a in alternatives)
    for alt in alternatives[:6]:
        env = make("sokoban")
        replay(env, alt.state.task, alt.state.actions, alt.state.hashes)
        assert alt.outcome == observation_message(alt.state.index, alt.action, env.step(alt.action).observation)


def test_iwm_row_predicts_the_observed_outcome(collected, tiny_tokenizer):
    engine, *_, alternatives, _, _ = collected
    alt = alternatives[0]
    row = iwm_row(engine, alt)
    assert labelled_text(row, tiny_tokenizer) == alt.outcome
    context = tiny_tokenizer.decode(row.input_ids[: row.labels.index(next(t for t in row.labels if t != -100))])
    assert context.index(f"Action: {alt.action}") < context.index(WORLD_MODEL_PROMPT)
    # The alternative's ids are in the context exactly as sampled.
    ids = row.input_ids
    assert any(ids[i : i + len(alt.token_ids)] == alt.token_ids for i in range(len(ids)))


def test_sr_filter_keeps_only_rationales_ending_in_the_expert_action(collected, tiny_tokenizer):
    engine, _, states, _, _, alternatives, _, settings = collected
    rows, stats = self_reflection_rows(engine, alternatives, settings)
    with_alternatives = {id(a.state): a.state for a in alternatives}.values()
    disagree = sum(1 for s in with_alternatives if s.expert_action == "right")
    assert stats["rationales"] == len(with_alternatives) and stats["dropped_disagree"] == disagree
    assert stats["kept"] == len(rows) == len(with_alternatives) - disagree > 0
    for row in rows:
        text = labelled_text(row, tiny_tokenizer)
        assert "moves the box toward the goal" in text
        context = tiny_tokenizer.decode(row.input_ids)
        assert "An expert chose" not in context  # the row's input is the state h_i, not the SR prompt
        assert parse_action(text) != "right"


@pytest.mark.parametrize("variant", ["iwm", "sr"])
def test_train_early_experience_writes_a_model(variant, tiny_model_dir, tiny_backend, tmp_path):
    from leafe.backends.hf import HFBackend
    from leafe.files import read_json

    settings = EarlyExperienceSettings(variant=variant, tasks=2, task_seed=40, alternatives=2, max_new_tokens=16,
                                       rationale_tokens=24)
    sft = SFTSettings(learning_rate=1e-3, epochs=1, batch_size=8)
    summary = train_early_experience(Job(str(tiny_model_dir), tmp_path / variant, backend=tiny_backend), settings, sft)
    saved = read_json(tmp_path / variant / "train.json")
    assert saved["data"]["expert_states"] > 0 and saved["cost"]["env_steps"] >= saved["data"]["expert_states"]
    assert saved["method"] == f"early-experience-{variant}"
    assert summary.method == "early_experience" and summary.model == str(tmp_path / variant)
    assert summary.data == saved["data"]
    HFBackend(str(tmp_path / variant), device="cpu")  # loads like any checkpoint
