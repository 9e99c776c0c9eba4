"""Rollback: by snapshot where the env can copy its state, by verified replay everywhere; a branch whose
replay diverges is refused and counted, never started from a wrong state."""

import random

import pytest
from helpers import ScriptedBackend, solver_reply

from leafe.envs import Env, ReplayDivergence, StepResult, Task, make, observation_hash, replay
from leafe.envs.sokoban import SokobanEnv, generate, solve
from leafe.method import Job
from leafe.methods.explore import explore
from leafe.prompts import REFLECTION_PROMPT
from leafe.settings import ExploreSettings
from leafe.trees import read_trees


def played(env, task, actions):
    """Play `actions` from reset; return (observation hashes, observations, xsb states)."""
    obs = env.reset(task)
    hashes, observations, states = [observation_hash(obs)], [obs], [env.to_xsb()]
    for a in actions:
        obs = env.step(a).observation
        hashes.append(observation_hash(obs))
        observations.append(obs)
        states.append(env.to_xsb())
    return hashes, observations, states


def a_task_and_actions():
    level = generate(7, max_moves=15)
    task = Task("sokoban-7", "sokoban", {"xsb": level})
    actions = ["left", "up", "jump", "right", "down"] + solve(level)
    return task, actions


def test_restore_puts_back_the_exact_state_at_every_step():
    task, actions = a_task_and_actions()
    env = make("sokoban", max_steps=40)
    env.reset(task)
    snapshots, xsbs = [env.snapshot()], [env.to_xsb()]
    for a in actions:
        env.step(a)
        snapshots.append(env.snapshot())
        xsbs.append(env.to_xsb())
    for tau in (0, 2, len(actions) - 1):
        env.restore(snapshots[tau])
        assert env.to_xsb() == xsbs[tau]
        assert env.steps_taken == tau
    # After restoring, the env plays on exactly as it did the first time.
    env.restore(snapshots[2])
    fresh = make("sokoban", max_steps=40)
    _, observations, _ = played(fresh, task, actions)
    for i, a in enumerate(actions[2:], start=2):
        assert env.step(a).observation == observations[i + 1]


def test_restore_is_independent_of_later_steps():
    task, actions = a_task_and_actions()
    env = make("sokoban", max_steps=40)
    env.reset(task)
    snap = env.snapshot()
    before = env.to_xsb()
    for a in actions:
        env.step(a)
    env.restore(snap)
    assert env.to_xsb() == before


def test_replay_reaches_the_recorded_state():
    task, actions = a_task_and_actions()
    hashes, observations, states = played(make("sokoban", max_steps=40), task, actions)
    env = make("sokoban", max_steps=40)
    tau = 4
    obs = replay(env, task, actions[:tau], hashes[: tau + 1])
    assert obs == observations[tau]
    assert env.to_xsb() == states[tau]


class FlakyEnv(Env):
    """An env whose observations depend on hidden randomness, as a non-deterministic server might."""

    name = "flaky"

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def reset(self, task):
        self.instruction = "count"
        return "start"

    def step(self, action):
        return StepResult(f"value {self.rng.randint(0, 9)}", 0.0, False, False)

    def make_tasks(self, n, seed):
        return [Task(str(i), self.name, {}) for i in range(n)]


def test_replay_names_the_first_diverging_step():
    task = Task("0", "flaky", {})
    recorder = FlakyEnv(seed=1)
    hashes = [observation_hash(recorder.reset(task))]
    hashes += [observation_hash(recorder.step("a").observation) for _ in range(3)]
    with pytest.raises(ReplayDivergence, match=r"diverged at step 0 \(action 'a'\)"):
        replay(FlakyEnv(seed=2), task, ["a", "a", "a"], hashes)
    # The same randomness replays cleanly.
    assert replay(FlakyEnv(seed=1), task, ["a", "a", "a"], hashes).startswith("value")


def test_replay_checks_the_reset_observation_and_argument_lengths():
    task = Task("0", "flaky", {})
    with pytest.raises(ReplayDivergence, match="the reset observation"):
        replay(FlakyEnv(0), task, [], ["0" * 16])
    with pytest.raises(ValueError, match="one observation hash per action"):
        replay(FlakyEnv(0), task, ["a"], ["x"])


class NoisySokoban(SokobanEnv):
    """Sokoban whose first observation carries a random number, as a server that ignores the seed does:
    every replay of it diverges at the reset observation."""

    def reset(self, task):
        return f"{super().reset(task)}\nnoise {random.random()}"


def dance_until_told(text: str, i: int) -> str:
    """Dances (an invalid move) until an experience is in context, then plays the solver's moves; asked
    to reflect, names step 2 (or nothing, once it has an experience)."""
    told = "Experience from an earlier attempt" in text
    if REFLECTION_PROMPT in text.rsplit("<|im_start|>user", 1)[1]:
        return "Step: none\nExperience: on track." if told else "Step: 2\nExperience: stop dancing."
    return solver_reply(text) if told else "Thought: let me dance.\nAction: dance"


@pytest.mark.parametrize("env_class", [SokobanEnv, NoisySokoban])
def test_a_branch_whose_replay_diverges_is_refused_and_counted_and_a_deterministic_env_still_branches(
        env_class, tiny_tokenizer, tmp_path):
    settings = ExploreSettings(tasks=2, task_seed=40, budget=30, reflect_every=5, branch_samples=2,
                               snapshots=False, stop_on_success=True)  # rollback by replay
    job = Job("scripted", tmp_path, backend=ScriptedBackend(tiny_tokenizer, dance_until_told),
              envs=lambda name, **params: env_class(**params))
    summary = explore(job, settings).data
    trees = read_trees(tmp_path / "trees.jsonl")
    # Each reflection that asked for a rollback asked for branch_samples branches.
    asked = [2 * sum(r["branched"] for n in tree["nodes"] for r in n.reflections) for tree in trees]
    assert all(asked)
    if env_class is SokobanEnv:
        assert summary["success_rate"] == 1.0 and summary["replay_divergences"] == 0
        assert [tree["branches"] for tree in trees] == asked and summary["replayed_steps"] == 2 * sum(asked)
        return
    # Refused, every one: no branch node, no episode that starts anywhere but at a reset.
    assert [tree["replay_divergences"] for tree in trees] == asked
    assert summary["replay_divergences"] == sum(asked) and summary["branches"] == summary["replayed_steps"] == 0
    for tree in trees:
        assert all(n.parent is None and n.tau is None for n in tree["nodes"])
        assert all(s.action == "dance" for n in tree["nodes"] for s in n.episode.steps)
        # The roots that took the branches' place spent the whole budget.
        assert tree["env_steps"] == settings.budget and not tree["success"]
