"""Early Experience as its paper runs it: expert states, K distinct alternatives (the env's admissible
actions where it lists them, else policy samples) executed from a copy of the state, IWM rows for the
expert's own transitions and the alternatives', one world-modelling epoch inside the imitation budget,
the SR template and filter, and the rationale length an agent turn allows."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from helpers import ScriptedBackend

from leafe.envs import make
from leafe.envs.base import Env, StepResult, Task, replay
from leafe.errors import LeafeError
from leafe.files import read_json, read_jsonl
from leafe.method import Job
from leafe.methods.early_experience import (
    EarlyExperienceSettings,
    action_key,
    demonstrations,
    iwm_row,
    sample_alternatives,
    self_reflection_rows,
    train_early_experience,
)
from leafe.prompts import EXPERT_ACTION_LABEL, WORLD_MODEL_PROMPT, format_reply, observation_message, parse_action
from leafe.rollout import RolloutEngine
from leafe.settings import SFTSettings

EXPERT = re.compile(rf"{EXPERT_ACTION_LABEL}: (.+)")


def policy(text: str, i: int) -> str:
    """Alternatives: up, left, down, up, left, ... (sample i); rationales: agree with the expert except when
    it says 'right'."""
    chosen = EXPERT.findall(text)
    if chosen:
        expert = chosen[-1]
        conclusion = "left" if expert == "right" else expert
        return f"Thought: {expert} moves the box toward the goal.\nAction: {conclusion}"
    return f"Thought: try.\nAction: {['up', 'left', 'down'][i % 3]}"


def labelled_text(row, tokenizer) -> str:
    return tokenizer.decode([t for t in row.labels if t != -100], skip_special_tokens=True)


def context_text(row, tokenizer) -> str:
    """The row's input before its first labelled token."""
    first = next(i for i, t in enumerate(row.labels) if t != -100)
    return tokenizer.decode(row.input_ids[:first])


@pytest.fixture()
def collected(tiny_tokenizer):
    backend = ScriptedBackend(tiny_tokenizer, policy)
    engine = RolloutEngine(backend, max_new_tokens=32)
    tasks = make("sokoban").make_tasks(3, 40)
    states, expert_rows, missing = demonstrations(engine, "sokoban", {}, tasks)
    settings = EarlyExperienceSettings(alternatives=3)
    alternatives, counts = sample_alternatives(engine, states, settings)
    return engine, tasks, states, expert_rows, missing, alternatives, counts, settings


def test_expert_states_follow_the_solver(collected, tiny_tokenizer):
    engine, tasks, states, expert_rows, missing, *_ = collected
    env = make("sokoban")
    plans = [env.expert_actions(t) for t in tasks]
    assert missing == 0 and len(states) == sum(len(p) for p in plans) and len(expert_rows) == 3
    assert [s.expert_action for s in states[: len(plans[0])]] == plans[0]
    assert all(s.admissible is None for s in states)  # Sokoban lists no admissible actions: the policy samples
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


def test_policy_alternatives_are_distinct_and_executed_from_the_expert_state(tiny_tokenizer):
    # K = 5 samples cycle through three actions: each state keeps each action once, never the expert's.
    engine = RolloutEngine(ScriptedBackend(tiny_tokenizer, policy), max_new_tokens=32)
    states, _, _ = demonstrations(engine, "sokoban", {}, make("sokoban").make_tasks(2, 40))
    alternatives, counts = sample_alternatives(engine, states, EarlyExperienceSettings(alternatives=5))
    by_state = {id(s): [a.action for a in alternatives if a.state is s] for s in states}
    for state in states:
        assert sorted(by_state[id(state)]) == sorted({"up", "left", "down"} - {state.expert_action})
    samples = ["up", "left", "down", "up", "left"]
    same = sum(samples.count(s.expert_action) for s in states)
    assert counts["alternatives_same_as_expert"] == same
    assert counts["alternatives_duplicate"] == 5 * len(states) - len(alternatives) - same > 0
    assert counts["alternatives_sampled"] == len(alternatives) and counts["alternatives_admissible"] == 0
    for alt in alternatives[:6]:
        env = make("sokoban")
        replay(env, alt.state.task, alt.state.actions, alt.state.hashes)
        assert alt.outcome == observation_message(alt.state.index, alt.action, env.step(alt.action).observation)


class LockEnv(Env):
    """A combination lock that lists its admissible actions: press its buttons in the code's order. A wrong
    button does nothing; 'look' describes it. Its list names 'look' twice, in two spellings."""

    name = "lock"
    supports_snapshot = True
    LISTED = ["press a", "press b", "press c", "press d", "press e", "look", "Look"]

    def make_tasks(self, n: int, seed: int) -> list[Task]:
        return [Task(f"lock-{i}", self.name, {"code": random.Random(i).sample("abcde", 3)}) for i in range(seed, seed + n)]

    def reset(self, task: Task) -> str:
        self.code, self.opened = task.spec["code"], 0
        self.instruction = "Open the lock."
        return "A lock with buttons a to e."

    def step(self, action: str) -> StepResult:
        if action == "look":
            return StepResult(f"The lock shows {self.opened} of 3.", 0.0, False, False)
        if action == f"press {self.code[self.opened]}":
            self.opened += 1
            done = self.opened == 3
            return StepResult("The lock opens." if done else f"Click ({self.opened} of 3).", float(done), done, done)
        return StepResult(f"You {action}. Nothing happens.", 0.0, False, False)

    def expert_actions(self, task: Task) -> list[str]:
        return [f"press {c}" for c in task.spec["code"]]

    def expert_thought(self, action: str) -> str:
        return f"the next digit: {action}."

    def admissible_actions(self) -> list[str]:
        return list(self.LISTED)

    def snapshot(self) -> tuple:
        return (self.code, self.opened)

    def restore(self, state: tuple) -> None:
        self.code, self.opened = state


def lock(name: str, **params) -> Env:
    assert name == "lock"
    return LockEnv()


def test_alternatives_are_distinct_admissible_actions_where_the_env_lists_them(tiny_tokenizer):
    backend = ScriptedBackend(tiny_tokenizer, policy)
    engine = RolloutEngine(backend, max_new_tokens=32)
    states, _, _ = demonstrations(engine, "lock", {}, LockEnv().make_tasks(2, 0), lock)
    assert len(states) == 6 and all(s.admissible == LockEnv.LISTED for s in states)
    calls = backend.stats.calls
    settings = EarlyExperienceSettings(env="lock", alternatives=3)
    alternatives, counts = sample_alternatives(engine, states, settings, lock)
    assert backend.stats.calls == calls  # no policy sample: the env listed its actions
    assert counts["alternatives_admissible"] == len(alternatives) == 3 * len(states)
    for state in states:
        drawn = [a for a in alternatives if a.state is state]
        keys = [action_key(a.action) for a in drawn]
        assert len(set(keys)) == 3 and state.expert_action not in keys and set(keys) <= {"press a", "press b", "press c",
                                                                                         "press d", "press e", "look"}
        for alt in drawn:  # executed from the state, and said in the demonstrations' voice
            env = LockEnv()
            env.reset(state.task)
            for action in state.actions:
                env.step(action)
            assert alt.outcome == observation_message(state.index, alt.action, env.step(alt.action).observation)
            assert tiny_tokenizer.decode(alt.token_ids, skip_special_tokens=True) == format_reply(
                f"the next digit: {alt.action}.", alt.action)
    # The draw is the seed's: the same again, and K beyond the list takes every other action once.
    again, _ = sample_alternatives(engine, states, settings, lock)
    assert [a.action for a in again] == [a.action for a in alternatives]
    every, _ = sample_alternatives(engine, states[:1], EarlyExperienceSettings(env="lock", alternatives=8), lock)
    assert sorted(action_key(a.action) for a in every) == sorted(
        {"press a", "press b", "press c", "press d", "press e", "look"} - {states[0].expert_action})


def test_k_defaults_to_the_papers_per_env():
    assert EarlyExperienceSettings(env="alfworld").alternatives == 8
    assert EarlyExperienceSettings(env="scienceworld").alternatives == 3
    assert EarlyExperienceSettings(env="sokoban").alternatives == 3
    assert EarlyExperienceSettings(env="alfworld", alternatives=2).alternatives == 2


SHARED_ALFWORLD = Path(__file__).resolve().parents[2] / "shared" / "data" / "alfworld"


@pytest.mark.skipif(not (SHARED_ALFWORLD / "json_2.1.1" / "valid_seen").is_dir(), reason="no ALFWorld games here")
def test_alfworld_alternatives_are_eight_of_the_games_admissible_commands(tiny_tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("alfworld")
    monkeypatch.setenv("LEAFE_CACHE", str(tmp_path / "cache"))
    params = {"data_dir": str(SHARED_ALFWORLD), "split": "valid_seen"}
    engine = RolloutEngine(ScriptedBackend(tiny_tokenizer, policy), max_new_tokens=32)
    task = make("alfworld", **params).make_tasks(1, 0)[0]
    states, _, _ = demonstrations(engine, "alfworld", params, [task])
    env = make("alfworld", **params)
    env.reset(task)
    listed = env.admissible_commands
    assert states[0].admissible == listed and len(listed) > 8
    alternatives, counts = sample_alternatives(engine, states[:1], EarlyExperienceSettings(env="alfworld",
                                                                                           env_params=params))
    actions = [a.action for a in alternatives]
    assert len(set(actions)) == len(actions) == 8 == counts["alternatives_admissible"]
    assert set(actions) <= set(listed) and states[0].expert_action not in actions
    assert alternatives[0].outcome == observation_message(0, actions[0], env.step(actions[0]).observation)


def test_iwm_row_predicts_the_observed_outcome(collected, tiny_tokenizer):
    engine, *_, alternatives, _, _ = collected
    alt = alternatives[0]
    row = iwm_row(engine, alt)
    assert labelled_text(row, tiny_tokenizer) == alt.outcome
    context = context_text(row, tiny_tokenizer)
    assert context.index(f"Action: {alt.action}") < context.index(WORLD_MODEL_PROMPT)
    # The alternative's ids are in the context exactly as sampled.
    ids = row.input_ids
    assert any(ids[i : i + len(alt.token_ids)] == alt.token_ids for i in range(len(ids)))


def fake_sft(calls: list):
    """A stand-in for the SFT (`Job.train_sft`): records what would be trained, trains nothing."""

    def train_sft(start: str, rows: list, out: Path, sft: SFTSettings) -> dict:
        calls.append((start, rows, out, sft))
        return {"rows": len(rows), "steps": 0, "log": [], "ran": "recorded"}

    return train_sft


def test_iwm_trains_the_expert_transitions_and_one_world_model_epoch_inside_the_imitation_budget(
        tiny_model_dir, tiny_tokenizer, tmp_path):
    settings = EarlyExperienceSettings(tasks=2, task_seed=40, alternatives=2, max_new_tokens=32)
    calls: list = []
    job = Job(str(tiny_model_dir), tmp_path / "ee", backend=ScriptedBackend(tiny_tokenizer, policy),
              train_sft=fake_sft(calls))
    result = train_early_experience(job, settings, SFTSettings(epochs=2))
    (start, iwm_rows, where, world), (start2, imitation_rows, where2, imitation) = calls
    assert (start, where, world.epochs) == (str(tiny_model_dir), tmp_path / "ee" / "iwm", 1)
    assert (start2, where2, imitation.epochs) == (str(tmp_path / "ee" / "iwm"), tmp_path / "ee", 1)  # 2 = 1 + 1
    assert all(r.kind == "expert" for r in imitation_rows)
    # Every expert transition (s_i, a_i, s_{i+1}) is a world-model row: the expert's reply -> what followed.
    engine = RolloutEngine(ScriptedBackend(tiny_tokenizer, policy), max_new_tokens=32)
    states, _, _ = demonstrations(engine, "sokoban", {}, make("sokoban").make_tasks(2, 40))
    def is_expert_transition(row, state) -> bool:
        h, reply = state.conv.ids, state.expert_reply
        after = row.input_ids[len(h):]
        return (row.input_ids[: len(h)] == h and any(after[i : i + len(reply)] == reply for i in range(len(after)))
                and labelled_text(row, tiny_tokenizer) == state.expert_outcome
                and context_text(row, tiny_tokenizer).rstrip().rfind(WORLD_MODEL_PROMPT) > 0)

    for state in states:
        assert any(is_expert_transition(r, state) for r in iwm_rows), f"no row for {state.task.task_id} step {state.index}"
    assert result.data["iwm_expert_rows"] == len(states)
    assert result.data["iwm_rows"] == len(iwm_rows) == len(states) + result.data["alternatives"]
    assert len(list(read_jsonl(tmp_path / "ee" / "rows.jsonl"))) == len(iwm_rows) + len(imitation_rows)
    # The world model's epochs come out of the budget: none left for imitation is refused before sampling.
    with pytest.raises(LeafeError, match=r"iwm_epochs \(2\) must be < the SFT's epochs \(2\)"):
        train_early_experience(Job(str(tiny_model_dir), tmp_path / "none", backend=ScriptedBackend(tiny_tokenizer, policy)),
                               EarlyExperienceSettings(iwm_epochs=2), SFTSettings(epochs=2))
    assert not (tmp_path / "none" / "rows.jsonl").exists()


def test_a_study_refuses_an_iwm_budget_that_leaves_no_imitation_before_any_stage_runs():
    from leafe.study.config import StudyConfig

    config = StudyConfig.model_validate({"name": "x", "early_experience": {"sft": {"epochs": 1}}})
    with pytest.raises(LeafeError, match=r"iwm_epochs \(1\) must be < the SFT's epochs \(1\)"):
        config.check()
    StudyConfig.model_validate({"name": "x", "early_experience": {"variant": "sr", "sft": {"epochs": 1}}}).check()


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
        assert EXPERT_ACTION_LABEL not in context  # the row's input is the state h_i, not the SR prompt
        assert parse_action(text) != "right"


def test_the_sr_prompt_contrasts_every_alternative_with_the_experts_outcome(collected, tiny_tokenizer):
    engine, _, states, _, _, alternatives, _, settings = collected
    prompts: list[str] = []
    recording = ScriptedBackend(tiny_tokenizer, lambda text, i: prompts.append(text) or policy(text, i))
    self_reflection_rows(RolloutEngine(recording, max_new_tokens=32), alternatives, settings)
    state = alternatives[0].state
    alts = [a for a in alternatives if a.state is state]
    prompt = prompts[0][prompts[0].index("Each of these actions was tried"):]
    assert f"{EXPERT_ACTION_LABEL}: {state.expert_action}\nWhat followed:\n{state.expert_outcome}" in prompt
    for j, alt in enumerate(alts, 1):
        assert f"Alternative {j}: {alt.action}\nWhat followed:\n{alt.outcome}" in prompt
    assert "for each alternative" in prompt and "without mentioning an expert" in prompt
    assert f"Then end with the line 'Action: {state.expert_action}'." in prompt


def test_a_rationale_longer_than_an_agent_turn_is_refused_in_one_line():
    with pytest.raises(LeafeError) as refused:
        EarlyExperienceSettings(variant="sr", rationale_tokens=128, max_new_tokens=64).validate()
    message = str(refused.value)
    assert "\n" not in message and "--rationale-tokens (128)" in message and "--max-new-tokens (64)" in message
    assert "lower --rationale-tokens or raise --max-new-tokens" in message
    EarlyExperienceSettings(variant="sr", rationale_tokens=64, max_new_tokens=64).validate()
    EarlyExperienceSettings(variant="iwm", rationale_tokens=128, max_new_tokens=64).validate()  # IWM writes none
    EarlyExperienceSettings(variant="sr").validate()  # the defaults agree


def test_the_cli_refuses_a_rationale_longer_than_an_agent_turn_with_status_2(tmp_path):
    from typer.testing import CliRunner

    from leafe.cli import methods  # noqa: F401  (registers `train early-experience`)
    from leafe.cli.app import app

    run = CliRunner().invoke(app, ["train", "early-experience", "--variant", "sr", "--rationale-tokens", "128",
                                   "--model", str(tmp_path), "--out", str(tmp_path / "out")])
    assert run.exit_code == 2
    (line,) = run.stderr.strip().splitlines()
    assert "--rationale-tokens (128) must be <= --max-new-tokens (64)" in line


@pytest.mark.parametrize("variant", ["iwm", "sr"])
def test_train_early_experience_writes_a_model(variant, tiny_model_dir, tiny_backend, tmp_path):
    from leafe.backends.hf import HFBackend

    settings = EarlyExperienceSettings(variant=variant, tasks=2, task_seed=40, alternatives=1, max_new_tokens=16,
                                       rationale_tokens=16)
    sft = SFTSettings(learning_rate=1e-3, epochs=2, batch_size=8)
    summary = train_early_experience(Job(str(tiny_model_dir), tmp_path / variant, backend=tiny_backend), settings, sft)
    saved = read_json(tmp_path / variant / "train.json")
    assert saved["data"]["expert_states"] > 0 and saved["cost"]["env_steps"] >= saved["data"]["expert_states"]
    assert saved["method"] == f"early-experience-{variant}"
    assert summary.method == "early_experience" and summary.model == str(tmp_path / variant)
    assert summary.data == saved["data"]
    HFBackend(str(tmp_path / variant), device="cpu")  # loads like any checkpoint
