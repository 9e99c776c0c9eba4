"""ScienceWorld: the real simulator (its jar on Java), tasks by split, success and failure, step
limits, and rollback by replay, which must reproduce every observation even on tasks with animals,
bees and genetics (the simulator's randomness) and with other episodes stepping in the same JVM."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("scienceworld")
if shutil.which("java") is None:
    pytest.skip("ScienceWorld needs Java (apt-get install default-jre-headless)", allow_module_level=True)

from leafe.envs import make
from leafe.envs.base import EnvError, observation_hash, replay


def one_task(name: str, **params):
    env = make("scienceworld", tasks=name, split="dev", **params)
    return env, env.make_tasks(1, 0)[0]


def play(env, task, actions):
    observations = [env.reset(task)]
    for action in actions:
        step = env.step(action)
        observations.append(step.observation)
        if step.done:
            break
    return observations, step


def test_the_gold_path_completes_the_task():
    env, task = one_task("find-non-living-thing")
    assert "find a(n) non-living thing" in env.reset(task) + env.instruction
    assert "focus on OBJ" in env.instruction  # the command language is part of the instruction
    _, last = play(env, task, env.expert_actions(task))
    assert last.success and last.done and last.reward == 1.0 and last.info["score"] == 100
    assert last.observation.endswith("Task completed!")


def test_focusing_on_the_wrong_thing_fails_the_episode_and_nonsense_is_an_ordinary_step():
    env, task = one_task("find-living-thing")
    env.reset(task)
    nonsense = env.step("fly to the moon")
    assert nonsense.observation.startswith("No known action matches that input.") and not nonsense.done
    wrong = env.step("focus on lighter")
    assert wrong.done and not wrong.success and wrong.reward == 0.0 and wrong.info["score"] < 0
    assert "failed" in wrong.observation
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("look around")


def test_the_step_limit_ends_an_unfinished_episode():
    env, task = one_task("boil", max_steps=2)
    env.reset(task)
    assert not env.step("look around").done
    last = env.step("look around")
    assert last.done and not last.success and "No steps left (2 used)" in last.observation


@pytest.mark.parametrize("name", ["chemistry-mix-paint-tertiary-color", "grow-fruit"])
def test_replay_reproduces_every_observation_while_another_episode_shares_the_jvm(name):
    # The first task's rooms list look-alike cups whose order the stock simulator changes from load to
    # load; the second has bees pollinating at random. A second episode steps in between, drawing
    # from the same JVM, as batched rollouts do.
    env, task = one_task(name, max_steps=200)
    other, other_task = one_task("find-animal", max_steps=500)
    actions = env.expert_actions(task)
    observations = [env.reset(task)]
    other.reset(other_task)
    for action in actions:
        other.step("wait1")
        step = env.step(action)
        observations.append(step.observation)
        if step.done:
            break
    assert step.success
    hashes = [observation_hash(o) for o in observations]
    fresh, _ = one_task(name, max_steps=200)
    n = len(observations) - 1
    assert replay(fresh, task, actions[:n], hashes) == observations[-1]


def test_tasks_interleave_task_kinds_and_are_deterministic():
    env = make("scienceworld", tasks="boil, melt", split="test")
    tasks = env.make_tasks(4, 0)
    assert [t.spec["task_name"] for t in tasks] == ["boil", "melt", "boil", "melt"]
    assert tasks == make("scienceworld", tasks=["boil", "melt"], split="test").make_tasks(4, 0)
    assert env.make_tasks(2, 2) == tasks[2:]
    dev = {t.spec["variation"] for t in make("scienceworld", tasks="boil", split="dev").make_tasks(3, 0)}
    assert not dev & {t.spec["variation"] for t in tasks}  # splits hold different variations
    with pytest.raises(EnvError, match="has 18 variations; asked for 20"):
        env.make_tasks(20, 0)


def test_bad_settings_fail_in_one_line_naming_the_fix():
    with pytest.raises(EnvError, match="unknown ScienceWorld task 'boil-water'; known: boil, "):
        make("scienceworld", tasks="boil-water").make_tasks(1, 0)
    with pytest.raises(EnvError, match="split must be one of train, dev, test"):
        make("scienceworld", split="validation")


def test_valid_action_hints_list_what_can_be_done_here():
    env, task = one_task("find-non-living-thing", valid_action_hints=True)
    first = env.reset(task)
    hints = first.split("\nValid actions: ")[1].split(", ")
    assert "focus on lighter" in hints and "open freezer" in hints
    plain, _ = one_task("find-non-living-thing")
    assert "Valid actions" not in plain.reset(task)
