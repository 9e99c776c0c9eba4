"""TextWorld: games generated offline into the cache, played by the real interpreter; the walkthrough
wins; rollback by snapshot (an interpreter copy) and by verified replay both reproduce the game."""

from __future__ import annotations

import pytest

pytest.importorskip("textworld")

from leafe.envs import make
from leafe.envs.base import EnvError, observation_hash, replay


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("leafe-cache")


@pytest.fixture
def tasks(cache, monkeypatch):
    monkeypatch.setenv("LEAFE_CACHE", str(cache))
    return make("textworld").make_tasks(2, 0)  # generated once per module (~2 s a game), then cached


def test_the_walkthrough_wins_and_observations_are_clean(tasks):
    env = make("textworld")
    first = env.reset(tasks[0])
    assert first.startswith("-= ") and "TextWorld" not in first  # the room, not the banner
    walkthrough = env.expert_actions(tasks[0])
    objective, commands = env.instruction.split("\nCommands: ")
    assert walkthrough[-1].split()[-1] in objective and commands.startswith("look, inventory")
    assert walkthrough and all(isinstance(a, str) for a in walkthrough)
    for i, action in enumerate(walkthrough):
        step = env.step(action)
        assert step.done == (i == len(walkthrough) - 1)
        assert ">" not in step.observation and "The End" not in step.observation
    assert step.success and step.reward == 1.0 and step.observation.endswith("You won: the quest is complete.")


def test_an_unknown_verb_is_an_ordinary_step_and_the_step_limit_ends_the_episode(tasks):
    env = make("textworld", max_steps=2)
    env.reset(tasks[0])
    step = env.step("dance wildly")
    assert step.observation == "That's not a verb I recognise." and step.info["invalid"] and not step.done
    step = env.step("look")
    assert step.done and not step.success and "No steps left (2 used)" in step.observation


def test_snapshot_restore_returns_to_the_same_state_more_than_once(tasks):
    env = make("textworld")
    env.reset(tasks[0])
    walkthrough = env.expert_actions(tasks[0])
    env.step(walkthrough[0])
    snapshot = env.snapshot()
    rest = [env.step(a).observation for a in walkthrough[1:]]
    for _ in range(2):
        env.restore(snapshot)
        assert [env.step(a).observation for a in walkthrough[1:]] == rest
        assert env._done  # the restored copy is played to the win, and the snapshot survives it


def test_replay_of_a_prefix_is_verified_and_lands_in_the_same_state(tasks):
    env = make("textworld")
    observations = [env.reset(tasks[1])]
    walkthrough = env.expert_actions(tasks[1])
    observations += [env.step(a).observation for a in walkthrough]
    hashes = [observation_hash(o) for o in observations]
    fresh = make("textworld")
    assert replay(fresh, tasks[1], walkthrough[:-1], hashes[:-1]) == observations[-2]
    assert fresh.step(walkthrough[-1]).success


def test_games_are_generated_once_into_the_cache_and_tasks_are_deterministic(tasks, cache):
    games = sorted(p.name for p in (cache / "textworld").iterdir())
    assert games == ["tw-r3-o6-q3-s0.json", "tw-r3-o6-q3-s0.z8", "tw-r3-o6-q3-s1.json", "tw-r3-o6-q3-s1.z8"]
    built = (cache / "textworld" / "tw-r3-o6-q3-s0.z8").stat().st_mtime_ns
    assert make("textworld").make_tasks(2, 0) == tasks
    assert (cache / "textworld" / "tw-r3-o6-q3-s0.z8").stat().st_mtime_ns == built  # not rebuilt
    assert tasks[0].task_id == "textworld-r3-o6-q3-0" and tasks[0].spec["seed"] == 0


def test_a_directory_of_own_games_is_used_in_name_order(tasks, cache):
    own = make("textworld", games=str(cache / "textworld"))
    listed = own.make_tasks(2, 0)
    assert [t.task_id for t in listed] == ["textworld-tw-r3-o6-q3-s0", "textworld-tw-r3-o6-q3-s1"]
    assert own.reset(listed[1]) == make("textworld").reset(tasks[1])
    with pytest.raises(EnvError, match="has 2 TextWorld games"):
        own.make_tasks(3, 0)


def test_valid_action_hints_list_the_admissible_commands(tasks):
    env = make("textworld", valid_action_hints=True)
    hints = env.reset(tasks[0]).split("\nValid actions: ")[1].split(", ")
    assert env.expert_actions(tasks[0])[0] in hints and "look" in hints


def test_bad_settings_fail_in_one_line():
    with pytest.raises(EnvError, match="must be >= 1"):
        make("textworld", rooms=0)
