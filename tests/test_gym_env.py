"""The gym env on real Gymnasium envs: a text env this module registers (reached as
`test_gym_env:NumberLine-v0`, the module:id form that imports a user's module first) and Gymnasium's
own FrozenLake (a Discrete action space, named actions). Episodes, success, bad input, and stage 1:
rollback by verified replay from the seeded reset, and branches refused when the reset ignores the seed.
"""

from __future__ import annotations

import random
import re
import string

import gymnasium
import pytest
from helpers import ScriptedBackend, scripted_explorer

from leafe.envs import EnvError, make
from leafe.envs.contract import check_env
from leafe.method import Job
from leafe.methods.explore import explore
from leafe.settings import ExploreSettings
from leafe.trees import read_trees

ID = "test_gym_env:NumberLine-v0"
GOAL = re.compile(r"You are at (\d+)\. The goal is at (\d+)\.")


class NumberLine(gymnasium.Env):
    """Walk right or left to the goal; the seed draws the start and the goal. `noisy` adds a number the
    seed does not draw to the first observation, as an env whose reset ignores the seed."""

    action_space = gymnasium.spaces.Text(max_length=40, charset=string.printable)
    observation_space = gymnasium.spaces.Text(max_length=200, charset=string.printable)

    def __init__(self, noisy: bool = False):
        self.noisy = noisy

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.position = int(self.np_random.integers(0, 6))
        self.goal = self.position + int(self.np_random.choice([2, 3]))
        noise = f" (weather: {random.random():.6f})" if self.noisy else ""
        return f"You are at {self.position}. The goal is at {self.goal}.{noise}", {}

    def step(self, action):
        move = action.strip().lower()
        if move in ("left", "right"):
            self.position += 1 if move == "right" else -1
        elif move != "look":
            return f"Unknown action {move!r}: use left, right or look.", 0.0, False, False, {}
        if self.position == self.goal:
            return f"You reached the goal at {self.goal}.", 1.0, True, False, {"success": True}
        return f"You are at {self.position}. The goal is at {self.goal}.", 0.0, False, False, {"success": False}


if ID.split(":")[1] not in gymnasium.registry:
    gymnasium.register(ID.split(":")[1], entry_point=NumberLine)


def test_a_registered_text_env_plays_through_gymnasium_make_and_its_seed_fixes_the_episode():
    env = make("gym", id=ID, max_steps=8)
    tasks = env.make_tasks(3, 0)
    assert [t.task_id for t in tasks] == ["NumberLine-v0-0", "NumberLine-v0-1", "NumberLine-v0-2"]
    first = env.reset(tasks[0])
    assert first == make("gym", id=ID).reset(tasks[0]) and len({env.reset(t) for t in tasks}) == 3
    start, goal = map(int, GOAL.match(env.reset(tasks[0])).groups())
    assert env.step("jump").observation == "Unknown action 'jump': use left, right or look."
    for _ in range(goal - start):
        result = env.step("right")
    assert (result.observation, result.reward, result.done, result.success) == (
        f"You reached the goal at {goal}.", 1.0, True, True)
    with pytest.raises(RuntimeError, match="call reset"):
        env.step("right")
    env.reset(tasks[1])
    results = [env.step("look") for _ in range(8)]
    assert [r.done for r in results] == [False] * 7 + [True] and not any(r.success for r in results)
    assert results[-1].observation.endswith("No steps left (8 used): the task was not completed.")


@pytest.mark.parametrize("params", [dict(id=ID), dict(id="FrozenLake-v1", action_names="left,down,right,up")])
def test_the_adapter_keeps_the_env_contract(params):
    report = check_env(lambda: make("gym", max_steps=10, **params), actions=["left", "right", "up", "down"])
    assert report.replays == report.tasks == 3 and report.ended == 3


def test_a_discrete_space_takes_its_action_names_and_an_ending_reward_is_a_success():
    env = make("gym", id="FrozenLake-v1", make_kwargs={"is_slippery": False}, action_names="left,down,right,up")
    task = env.make_tasks(1, 7)[0]
    assert task.task_id == "FrozenLake-v1-7" and env.reset(task) == "0"  # the agent's cell, as JSON
    invalid = env.step("jump")
    assert invalid.observation == "Invalid action 'jump': use one of left, down, right, up."
    assert invalid.info == {"invalid": True} and not invalid.done
    results = [env.step(a) for a in ("Right", "right", "down", "down", "down", "right")]
    assert [r.observation for r in results] == ["1", "2", "6", "10", "14", "15"]  # 'jump' left it at 0
    assert results[-1].done and results[-1].success and results[-1].reward == 1.0
    numbered = make("gym", id="FrozenLake-v1", make_kwargs={"is_slippery": False})
    numbered.reset(task)
    assert numbered.step("2").observation == "1" and numbered.step("right").info == {"invalid": True}


@pytest.mark.parametrize("params, error", [
    (dict(), "env 'gym' needs a Gymnasium id: --env-param id=Name-v0"),
    (dict(id="NoSuchEnv-v0"), "gymnasium cannot make 'NoSuchEnv-v0': Environment `NoSuchEnv` doesn't exist"),
    (dict(id="no_such_module:NumberLine-v0"), "gymnasium cannot make 'no_such_module:NumberLine-v0': No module"),
    (dict(id=ID, make_kwargs={"size": 3}), "cannot make .* with make_kwargs \\{'size': 3\\}"),
    (dict(id=ID, make_kwargs=[1]), "make_kwargs must be a JSON object"),
    (dict(id=ID, action_names="a,b"), "action_names are for a Discrete action space"),
    (dict(id="FrozenLake-v1", action_names="left,right"), "must name each of FrozenLake-v1's 4 actions once"),
    (dict(id=ID, max_steps=0), "max_steps must be >= 1"),
])
def test_bad_input_is_one_env_error_line(params, error):
    with pytest.raises(EnvError, match=error) as raised:
        make("gym", **params)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("noisy", [False, True])
def test_explore_rolls_back_by_replaying_the_seeded_reset_and_refuses_what_does_not_replay(
        noisy, tiny_tokenizer, tmp_path):
    def expert(text):
        start, goal = map(int, GOAL.search(text).groups())
        return ["right"] * (goal - start)

    backend = ScriptedBackend(tiny_tokenizer, scripted_explorer(expert, "look"))
    settings = ExploreSettings(env="gym", env_params={"id": ID, "max_steps": 6, "make_kwargs": {"noisy": noisy}},
                               tasks=2, task_seed=0, budget=12, reflect_every=4, branch_samples=1, max_depth=1,
                               stop_on_success=True)
    summary = explore(Job("scripted", tmp_path, backend=backend), settings).data
    trees = read_trees(tmp_path / "trees.jsonl")
    if not noisy:  # the root looked 4 times; its branch from step 1 replayed step 0 and walked to the goal
        assert summary["success_rate"] == 1.0 and summary["replay_divergences"] == 0
        assert summary["branches"] == summary["branches_succeeded"] == summary["replayed_steps"] == 2
        for tree in trees:
            root, branch = tree["nodes"]
            assert branch.tau == 1 and branch.episode.steps[0].observation == root.episode.steps[0].observation
        return
    assert summary["branches"] == summary["replayed_steps"] == 0 and summary["success_rate"] == 0.0
    assert summary["replay_divergences"] == sum(t["replay_divergences"] for t in trees) > 0
    assert all(node.parent is None for tree in trees for node in tree["nodes"])
