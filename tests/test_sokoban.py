"""Sokoban rules, level format, solver and generator."""

import pytest

from leafe.envs import EnvError, Task, make
from leafe.envs.sokoban import SokobanEnv, generate, parse_direction, parse_xsb, read_collection, render, solve

CORRIDOR = """\
#######
#@ $ .#
#######"""


def level_env(xsb: str, max_steps: int = 15, **params) -> SokobanEnv:
    return SokobanEnv.from_xsb(xsb, max_steps=max_steps, **params)


def test_walking_moves_the_player_only():
    env = level_env(CORRIDOR)
    result = env.step("right")
    assert env.to_xsb() == "#######\n# @$ .#\n#######"
    assert result.info["moved"] and not result.info["pushed"]
    assert "You moved right." in result.observation
    assert not result.done and not result.success


def test_pushing_moves_the_box_and_the_player():
    env = level_env(CORRIDOR)
    env.step("right")
    result = env.step("right")
    assert env.to_xsb() == "#######\n#  @$.#\n#######"
    assert result.info["pushed"]
    assert "pushed a box right" in result.observation


def test_success_only_when_the_box_is_on_the_goal():
    env = level_env(CORRIDOR)
    results = [env.step("right") for _ in range(3)]
    assert [r.success for r in results] == [False, False, True]
    assert results[-1].done and results[-1].reward == 1.0
    assert env.to_xsb() == "#######\n#   @*#\n#######"
    assert "solved" in results[-1].observation


def test_success_needs_every_box_on_a_goal():
    env = level_env("########\n#@$ $..#\n########")
    # Pushing the first box right runs it into the second one: blocked, nothing moves.
    first = env.step("right")
    second = env.step("right")
    assert first.info["pushed"] and not second.info["moved"]
    assert "another box is behind it" in second.observation
    assert env.to_xsb() == "########\n# @$$..#\n########"

    env = level_env("#######\n#@$ ..#\n#  $  #\n#######")
    env.step("right")
    result = env.step("right")  # one box on a goal, the other not: not solved
    assert result.info["boxes_on_goals"] == 1
    assert not result.success and not result.done


def test_walls_stop_the_player_and_the_box():
    env = level_env(CORRIDOR)
    result = env.step("left")
    assert "bumped into a wall" in result.observation and not result.info["moved"]
    env = level_env("#####\n#@$##\n#  .#\n#####")
    result = env.step("right")
    assert "a wall is behind it" in result.observation
    assert env.to_xsb() == "#####\n#@$##\n#  .#\n#####"


def test_invalid_action_is_a_normal_step_with_feedback():
    env = level_env(CORRIDOR, max_steps=3)
    result = env.step("jump over the box")
    assert result.info["invalid"] and not result.done
    assert "Invalid action" in result.observation and "up, down, left, right" in result.observation
    assert env.steps_taken == 1


def test_actions_are_case_insensitive_and_tolerate_text_around_them():
    assert parse_direction("Action: Up") == "up"
    assert parse_direction("**RIGHT**.") == "right"
    assert parse_direction("move left") == "left"
    assert parse_direction("up or down") is None  # ambiguous
    assert parse_direction("north") is None
    env = level_env(CORRIDOR)
    assert env.step("Action: Right").info["moved"]


def test_step_limit_ends_the_episode_unsolved():
    env = level_env(CORRIDOR, max_steps=2)
    assert not env.step("left").done
    result = env.step("left")
    assert result.done and not result.success
    assert "No moves left" in result.observation
    with pytest.raises(RuntimeError):
        env.step("left")


def test_steps_outside_an_episode_are_refused_with_the_shared_messages():
    # Env.check_running: the one guard of every built-in env, before the first reset and after the end.
    env = make("sokoban")
    with pytest.raises(RuntimeError, match=r"^the sokoban env has no level yet; call reset\(task\) first$"):
        env.step("up")
    with pytest.raises(RuntimeError, match="no level yet"):
        env.snapshot()
    task = env.make_tasks(1, 0)[0]
    env.reset(task)
    results = [env.step(action) for action in env.expert_actions(task)]
    assert results[-1].done and results[-1].success
    with pytest.raises(RuntimeError, match=r"^step\(\) after the episode ended; call reset\(\) first$"):
        env.step("up")
    env.reset(task)
    assert env.step(env.expert_actions(task)[0]).observation  # a new episode takes steps again


def test_pushing_a_box_into_a_dead_corner_says_the_level_is_lost():
    env = level_env("######\n#    #\n# $@ #\n#.   #\n######")
    result = env.step("left")  # box to (2,1): against the left wall, goal is below-left... still live
    assert result.info["solvable"] is True
    env = level_env("######\n#  . #\n# $@ #\n#    #\n######")
    result = env.step("left")  # box into column 1 with the goal in column 3: never reachable again
    assert result.info["solvable"] is False
    assert "can no longer be solved" in result.observation


def test_end_when_lost_ends_the_episode_at_the_losing_step_only():
    lost_level = "######\n#  . #\n# $@ #\n#    #\n######"
    for params in ({}, {"end_when_lost": False}):
        result = level_env(lost_level, **params).step("left")
        assert "can no longer be solved" in result.observation and not result.done
    env = level_env(lost_level, end_when_lost=True)
    result = env.step("left")
    assert result.done and not result.success and result.reward == 0.0
    assert "can no longer be solved" in result.observation and "The attempt ends here." in result.observation
    # A move that loses nothing goes on, and a solved level still ends as solved.
    env = level_env(CORRIDOR, end_when_lost=True)
    assert not env.step("right").done
    assert not env.step("right").done
    assert env.step("right").success
    # Wasted moves lose a level too: the distance table says when too few are left.
    # (CORRIDOR takes 3 moves; bumping the wall twice leaves 3 of 5, the third bump leaves 2.)
    env = level_env(CORRIDOR, max_steps=5, end_when_lost=True)
    steps = [env.step("left") for _ in range(3)]
    assert [s.done for s in steps] == [False, False, True] and steps[-1].info["lost"]
    with pytest.raises(EnvError, match="end_when_lost must be true or false"):
        level_env(CORRIDOR, end_when_lost="no")


def test_observation_shows_the_grid_and_coordinates():
    env = make("sokoban")
    obs = env.reset(Task("t", "sokoban", {"xsb": CORRIDOR}))
    assert "#@_$_.#" in obs
    assert "you (1,1); boxes (1,3); goals (1,5); moves left 15" in obs


def test_xsb_round_trip():
    for seed in range(20):
        level = generate(seed, max_moves=15)
        assert render(*parse_xsb(level)) == level
        assert level_env(level).to_xsb() == level
    assert level_env("####\n#+*#\n#$ #\n####").to_xsb() == "####\n#+*#\n#$ #\n####"
    # '-' and '_' are accepted as floor and written back as spaces.
    assert level_env("#######\n#@-$_.#\n#######").to_xsb() == "#######\n#@ $ .#\n#######"


@pytest.mark.parametrize(
    "level, message",
    [
        ("#####\n# $.#\n#####", "no player"),
        ("######\n#@$.@#\n######", "2 players"),
        ("######\n#@$$.#\n######", "2 boxes but 1 goals"),
        ("#####\n#@$.\n#####", "open"),
        ("#####\n#@ .#\n#####", "no box"),
        ("#####\n#@$x#\n#####", "unknown character"),
        ("", "empty"),
    ],
)
def test_malformed_levels_get_a_clear_error(level, message):
    with pytest.raises(EnvError, match=message):
        parse_xsb(level)


def test_solver_finds_optimal_solutions():
    assert solve(CORRIDOR) == ["right", "right", "right"]
    # Push left to the wall, walk round above the box, push it down twice (5 moves); pushing
    # down first and then left takes 7.
    level = "######\n#    #\n# $@ #\n#    #\n#.   #\n######"
    solution = solve(level)
    assert solution == ["left", "up", "left", "down", "down"]
    env = level_env(level)
    assert [env.step(a).success for a in solution][-1]
    assert solve("######\n#$  .#\n#@   #\n######") is None  # box in a corner: unsolvable


def test_generator_is_deterministic_and_levels_are_solvable():
    a = [generate(s, max_moves=15) for s in range(50)]
    b = [generate(s, max_moves=15) for s in range(50)]
    assert a == b
    assert len(set(a)) > 40
    for level in a:
        solution = solve(level)
        assert solution is not None and 2 <= len(solution) <= 15


def test_generator_honours_size_boxes_and_move_bounds():
    level = generate(3, dim=(8, 9), boxes=2, max_moves=30, min_moves=5)
    room, state = parse_xsb(level)
    assert (room.height, room.width) == (8, 9)
    assert len(state.boxes) == 2 and len(room.goals) == 2
    assert 5 <= len(solve(level)) <= 30
    with pytest.raises(EnvError, match="max_moves"):
        generate(0, max_moves=1, min_moves=2)


def test_make_tasks_uses_consecutive_seeds():
    env = make("sokoban", max_steps=12)
    tasks = env.make_tasks(3, 500)
    assert [t.task_id for t in tasks] == ["sokoban-500", "sokoban-501", "sokoban-502"]
    assert tasks[1].spec["xsb"] == generate(501, max_moves=12)
    assert env.expert_actions(tasks[0]) == solve(tasks[0].spec["xsb"])


def test_levels_file_gives_its_levels_in_order(tmp_path):
    path = tmp_path / "pack.xsb"
    path.write_text(f"; 1\n{CORRIDOR}\n\nTitle: second\n####\n#@$.#\n####\n")
    assert read_collection(str(path)) == [CORRIDOR, "####\n#@$.#\n####"]
    tasks = make("sokoban", levels=str(path)).make_tasks(2, 0)
    assert [t.spec["xsb"] for t in tasks] == [CORRIDOR, "####\n#@$.#\n####"]
    path.write_text("#####\n#@$$.#\n#####\n")
    with pytest.raises(EnvError, match="level 0 of"):
        read_collection(str(path))


def test_registry_rejects_unknown_envs_and_parameters():
    with pytest.raises(EnvError, match="unknown env 'chess'"):
        make("chess")
    with pytest.raises(EnvError, match="no parameter 'colour'"):
        make("sokoban", colour="red")


def test_feedback_marks_the_one_step_that_loses_the_level():
    import random

    from leafe.envs.sokoban.oracle import Expert, first_mistake

    rng = random.Random(0)
    marked = 0
    for task in SokobanEnv().make_tasks(40, 3000):
        env = SokobanEnv(max_steps=15)
        env.reset(task)
        actions, lost_at = [], []
        for t in range(15):
            actions.append(rng.choice(["up", "down", "left", "right", "wait"]))
            result = env.step(actions[-1])
            if f"From step {t} on, the level can no longer be solved" in result.observation:
                assert result.info["lost"]
                lost_at.append(t)
            if result.done:
                break
        truth = first_mistake(Expert.of(task, 15), actions)
        assert lost_at == ([] if truth is None or result.success else [truth])
        marked += bool(lost_at)
    assert marked >= 10  # random play loses most levels
