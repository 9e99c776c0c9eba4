"""The alfworld env on ALFWorld-format games written here: expert wins, unknown commands, replay, tasks.

ALFWorld's data cannot be downloaded in tests, so `write_game` packages a small kitchen scene the way
`alfworld-generate` packages an ALFRED trial: a PDDL problem over the shipped `alfred.pddl` domain,
the shipped `alfred.twl2` grammar with the goal filled in, into
`<data>/json_2.1.1/<split>/<task>/<trial>/game.tw-pddl`. The real textworld/fast-downward engine plays it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("textworld")
alfworld = pytest.importorskip("alfworld")

import leafe.envs.alfworld as alfworld_env  # noqa: E402  (registers "alfworld")
from leafe.envs import EnvError, make, names, observation_hash, replay  # noqa: E402
from leafe.envs.alfworld import AlfWorldEnv  # noqa: E402

SPLIT = "valid_seen"
ROOM = ("You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a countertop 1, "
        "and a fridge 1.")
APPLE_PLAN = ["go to countertop 1", "take apple 1 from countertop 1", "go to fridge 1", "open fridge 1",
              "move apple 1 to fridge 1"]
MUG_WALKTHROUGH = ["look", "go to countertop 1", "take mug 1 from countertop 1", "go to cabinet 1",
                   "open cabinet 1", "move mug 1 to cabinet 1"]


def mangle(kind: str, *xyz: float) -> str:
    """An ALFRED object id, mangled as in ALFWorld's PDDL: 'Apple|-01.20|...' -> 'Apple_bar__minus_01_dot_20...'."""
    parts = [kind] + [f"{v:+06.2f}".replace("+", "_plus_").replace("-", "_minus_").replace(".", "_dot_") for v in xyz]
    return "_bar_".join(parts)


APPLE, MUG = mangle("Apple", -1.2, 0.95, 0.3), mangle("Mug", 0.4, 0.91, -0.75)
COUNTER = mangle("CounterTop", -1.0, 0.95, 0.1)
FRIDGE, CABINET = mangle("Fridge", 1.5, 0.0, -0.5), mangle("Cabinet", 0.4, 2.0, -0.8)
PLACES = {COUNTER: "loc_bar__minus_4_bar_1_bar_3_bar_45", FRIDGE: "loc_bar_5_bar__minus_2_bar_1_bar_60",
          CABINET: "loc_bar_1_bar__minus_3_bar_2_bar_0"}


def kitchen_problem(obj_type: str, recep_type: str) -> str:
    """A counter with an apple and a mug, a closed fridge and cabinet; goal: some `obj_type` in some `recep_type`."""
    start = "loc_bar_0_bar_0_bar_0_bar_30"
    objects = (["agent1 - agent", f"{start} - location"] + [f"{loc} - location" for loc in PLACES.values()]
               + [f"{t}Type - otype" for t in ("Apple", "Mug")]
               + [f"{t}Type - rtype" for t in ("CounterTop", "Fridge", "Cabinet")]
               + [f"{o} - object" for o in (APPLE, MUG)] + [f"{r} - receptacle" for r in PLACES])
    init = [f"(atLocation agent1 {start})"]
    for recep, loc in PLACES.items():
        init += [f"(receptacleAtLocation {recep} {loc})", f"(receptacleType {recep} {recep.split('_bar_')[0]}Type)"]
    init += [f"(openable {FRIDGE})", f"(openable {CABINET})"]
    for obj in (APPLE, MUG):
        init += [f"(objectType {obj} {obj.split('_bar_')[0]}Type)", f"(pickupable {obj})",
                 f"(inReceptacle {obj} {COUNTER})", f"(objectAtLocation {obj} {PLACES[COUNTER]})"]
    init += [f"(canContain {r}Type {o}Type)" for r in ("CounterTop", "Fridge") for o in ("Apple", "Mug")]
    init += ["(canContain CabinetType MugType)"]
    goal = (f"(exists (?r - receptacle) (exists (?o - object) (and (objectType ?o {obj_type}Type) "
            f"(receptacleType ?r {recep_type}Type) (inReceptacle ?o ?r))))")
    return (f"(define (problem plan_leafe_{obj_type}_{recep_type})\n(:domain alfred)\n"
            + "(:objects\n" + "\n".join(objects) + "\n)\n(:init\n" + "\n".join(init) + "\n)\n"
            + f"(:goal\n(and\n{goal}\n)\n)\n)\n")


def write_game(data: Path, task: str, trial: str, problem: str, goal: str, walkthrough=None, solvable=True) -> Path:
    """A game.tw-pddl as `alfworld-generate` writes it: domain, grammar with the goal, problem, expert data."""
    path = data / "json_2.1.1" / SPLIT / task / trial / "game.tw-pddl"
    path.parent.mkdir(parents=True)
    grammar = Path(alfworld.ALFRED_TWL2_PATH).read_text().replace("UNKNOWN GOAL", goal)
    game = {"pddl_domain": Path(alfworld.ALFRED_PDDL_PATH).read_text(), "grammar": grammar,
            "pddl_problem": problem, "solvable": solvable, "walkthrough": walkthrough}
    path.write_text(json.dumps(game))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("alfworld_data")
    write_game(data, "pick_and_place_simple-Mug-None-Cabinet-1", "trial_T2", kitchen_problem("Mug", "Cabinet"),
               "put a mug in cabinet", walkthrough=MUG_WALKTHROUGH)
    write_game(data, "pick_and_place_simple-Apple-None-Fridge-1", "trial_T1", kitchen_problem("Apple", "Fridge"),
               "put an apple in fridge")
    # Skipped as ALFWorld skips them: a game marked unsolvable, a trial with movable receptacles.
    write_game(data, "pick_and_place_simple-Apple-None-Fridge-2", "trial_T3", kitchen_problem("Apple", "Cabinet"),
               "put an apple in cabinet", solvable=False)
    write_game(data, "pick_and_place_simple-Mug-None-Fridge-1", "trial_T4_movable", kitchen_problem("Mug", "Fridge"),
               "put a mug in fridge")
    return data


@pytest.fixture(autouse=True)
def translation_cache(tmp_path, monkeypatch) -> Path:
    """Each test starts with empty translation caches: a disk cache of its own, nothing in memory."""
    monkeypatch.setenv("LEAFE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(alfworld_env, "_memory", type(alfworld_env._memory)())
    return tmp_path / "cache" / "alfworld"


@pytest.fixture
def translations(monkeypatch) -> list[bool]:
    """Records every PDDL translation fast-downward really does (its `optimize` flag)."""
    import fast_downward

    done, translate = [], fast_downward.pddl2sas

    def counted(domain, problem, verbose=False, optimize=False):
        done.append(optimize)
        return translate(domain, problem, verbose=verbose, optimize=optimize)

    monkeypatch.setattr(fast_downward, "pddl2sas", counted)
    return done


@pytest.fixture
def parses(monkeypatch) -> list[str]:
    """Records every parse of a game's grammar textworld really does."""
    from textworld.envs.pddl import logic

    done, parse = [], logic._parse_and_convert  # what GameLogic() spends its time in

    def counted(grammar, **kwargs):
        done.append(grammar)
        return parse(grammar, **kwargs)

    monkeypatch.setattr(logic, "_parse_and_convert", counted)
    return done


@pytest.fixture
def env(data_dir) -> AlfWorldEnv:
    return make("alfworld", data_dir=str(data_dir))


def test_the_planner_expert_wins_the_apple_game(env):
    apple = env.make_tasks(1, 0)[0]
    assert apple.spec["task_type"] == "pick_and_place_simple"
    assert env.expert_actions(apple) == APPLE_PLAN  # no walkthrough in the file: fast-downward's plan
    assert env.reset(apple) == ROOM  # the room, without the welcome banner
    assert env.instruction.endswith("\n\nYour task is to: put an apple in fridge.")
    results = [env.step(action) for action in APPLE_PLAN]
    assert [r.done for r in results] == [False] * 4 + [True]
    assert results[0].observation == "You arrive at countertop 1. On the countertop 1, you see a apple 1, and a mug 1."
    last = results[-1]
    assert last.success and last.reward == 1.0 and last.observation == "You move the apple 1 to the fridge 1."
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("look")


def test_a_stored_walkthrough_is_the_expert_and_wins_in_an_env_that_played_another_game(env):
    apple, mug = env.make_tasks(2, 0)
    env.reset(apple)
    env.step("go to countertop 1")
    assert env.expert_actions(mug) == MUG_WALKTHROUGH
    env.reset(mug)
    assert env.instruction.endswith("Your task is to: put a mug in cabinet.")
    results = [env.step(action) for action in MUG_WALKTHROUGH]
    assert not any(r.success for r in results[:-1])
    assert results[-1].success and results[-1].done and results[-1].reward > 0


def test_an_unknown_command_is_an_ordinary_step_that_nothing_happens(env):
    env.reset(env.make_tasks(1, 0)[0])
    step = env.step("fly to the moon")
    assert (step.observation, step.reward, step.done, step.success) == ("Nothing happens.", 0.0, False, False)
    assert step.info["invalid"]
    # The game goes on; case, spacing and a final period are forgiven.
    step = env.step("Go to  countertop 1.")
    assert step.observation.startswith("You arrive at countertop 1.") and not step.info["invalid"]


def test_the_step_limit_ends_an_unsolved_episode(data_dir):
    env = make("alfworld", data_dir=str(data_dir), max_steps=2)
    env.reset(env.make_tasks(1, 0)[0])
    assert not env.step("look").done
    last = env.step("inventory")
    assert last.done and not last.success and last.reward == 0.0
    assert last.observation == "You are not carrying anything.\nNo steps left (2 used): the task was not completed."


def test_valid_action_hints_append_the_games_valid_commands(data_dir):
    env = make("alfworld", data_dir=str(data_dir), valid_action_hints=True)
    first = env.reset(env.make_tasks(1, 0)[0])
    listed = "go to cabinet 1, go to countertop 1, go to fridge 1, help, inventory, look"
    assert first == f"{ROOM}\nValid actions: {listed}"
    assert "take apple 1 from countertop 1" in env.step("go to countertop 1").observation


def test_rollback_replays_the_prefix_to_the_same_state_and_continuation(env):
    assert not env.supports_snapshot
    with pytest.raises(NotImplementedError, match="replay"):
        env.snapshot()
    task = env.make_tasks(1, 0)[0]
    prefix = ["go to countertop 1", "jump", "take apple 1 from countertop 1", "go to fridge 1", "open fridge 1",
              "close fridge 1", "open fridge 1"]
    hashes = [observation_hash(env.reset(task))] + [observation_hash(env.step(a).observation) for a in prefix]
    branch = env.step("inventory")  # the original continuation; then the episode goes on and ends
    assert branch.observation == "You are carrying: a apple 1." and env.step("move apple 1 to fridge 1").done
    # The same env, now past the prefix, is put back: same last observation, same continuation.
    last = replay(env, task, prefix, hashes)
    assert last == "You open the fridge 1. The fridge 1 is open. In it, you see nothing."
    again = env.step("inventory")
    assert (again.observation, again.done) == (branch.observation, branch.done)
    # A fresh env replays to the same state too, and the apple is still in hand to finish the task.
    fresh = make("alfworld", data_dir=str(env.data_dir))
    assert replay(fresh, task, prefix, hashes) == last
    assert fresh.step("move apple 1 to fridge 1").success


def test_make_tasks_indexes_the_sorted_playable_games_deterministically(env, data_dir):
    tasks = env.make_tasks(2, 0)
    assert tasks == env.make_tasks(2, 0)
    assert [t.task_id for t in tasks] == ["alfworld-valid_seen-0", "alfworld-valid_seen-1"]
    assert [t.spec["game"] for t in tasks] == [
        "json_2.1.1/valid_seen/pick_and_place_simple-Apple-None-Fridge-1/trial_T1/game.tw-pddl",
        "json_2.1.1/valid_seen/pick_and_place_simple-Mug-None-Cabinet-1/trial_T2/game.tw-pddl",
    ]  # sorted paths; the unsolvable and the movable-receptacle games are left out
    assert env.make_tasks(1, 1) == tasks[1:]
    with pytest.raises(EnvError, match="has 2 games; asked for 2 from index 1"):
        env.make_tasks(2, 1)


def test_making_it_without_data_is_a_one_line_error_naming_alfworld_data_and_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(EnvError) as error:
        make("alfworld")
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "nowhere" / "json_2.1.1" / "valid_seen") in message
    assert "ALFWORLD_DATA" in message and "alfworld-download" in message and "pip install 'leafe[alfworld]'" in message


def test_the_registry_builds_it_and_rejects_unknown_parameters(data_dir):
    assert "alfworld" in names()
    assert isinstance(make("alfworld", data_dir=str(data_dir), split="valid_seen"), AlfWorldEnv)
    with pytest.raises(EnvError, match="has no parameter 'steps'"):
        make("alfworld", steps=3)
    with pytest.raises(EnvError, match="unknown ALFWorld split 'test'"):
        make("alfworld", split="test")


def play(env, task, actions) -> list[tuple[str, list[str]]]:
    """The reset observation and each step's, each with the valid commands after it."""
    seen = [(env.reset(task), env.admissible_commands)]
    return seen + [(env.step(a).observation, env.admissible_commands) for a in actions]


def test_a_game_is_parsed_and_translated_once_then_reset_and_reloaded_from_the_cache(
        data_dir, translations, parses, translation_cache):
    env = make("alfworld", data_dir=str(data_dir))
    apple = env.make_tasks(1, 0)[0]
    first = play(env, apple, APPLE_PLAN)
    assert sorted(translations) == [False, True]  # textworld asks for four: plain and optimised, at load and reset
    assert len(parses) == 1 and len(list(translation_cache.glob("*/*.pkl"))) == 3
    assert play(env, apple, APPLE_PLAN) == first and len(translations) == 2  # a replay's reset translates nothing
    assert play(make("alfworld", data_dir=str(data_dir)), apple, APPLE_PLAN) == first  # a new env, as each episode
    assert (len(translations), len(parses)) == (2, 1)
    alfworld_env._memory.clear()  # as a new process would: only the disk cache is left
    fresh = make("alfworld", data_dir=str(data_dir))
    assert play(fresh, apple, APPLE_PLAN) == first and (len(translations), len(parses)) == (2, 1)
    assert first[-1][0] == "You move the apple 1 to the fridge 1."


def test_cached_and_uncached_games_play_the_same(data_dir, monkeypatch, translations, parses):
    task = make("alfworld", data_dir=str(data_dir)).make_tasks(1, 0)[0]
    cached = play(make("alfworld", data_dir=str(data_dir)), task, APPLE_PLAN)
    cached_again = play(make("alfworld", data_dir=str(data_dir)), task, APPLE_PLAN)
    monkeypatch.setattr(alfworld_env, "USE_CACHE", False)
    count = len(translations)
    uncached = play(make("alfworld", data_dir=str(data_dir)), task, APPLE_PLAN)
    assert cached == cached_again == uncached
    assert len(translations) - count == 4  # textworld alone: two translations at load, two at reset
    assert len(parses) == 2  # the first cached load and the uncached one


def test_a_damaged_cache_file_is_translated_again_and_rewritten(data_dir, translations, translation_cache):
    task = make("alfworld", data_dir=str(data_dir)).make_tasks(1, 0)[0]
    first = play(make("alfworld", data_dir=str(data_dir)), task, APPLE_PLAN[:2])
    for path in translation_cache.glob("*/*.pkl"):
        path.write_bytes(path.read_bytes()[:100])  # cut off, as by a full disk
    alfworld_env._memory.clear()
    assert play(make("alfworld", data_dir=str(data_dir)), task, APPLE_PLAN[:2]) == first
    assert len(translations) == 4
    alfworld_env._memory.clear()
    assert play(make("alfworld", data_dir=str(data_dir)), task, APPLE_PLAN[:2]) == first and len(translations) == 4


def test_an_unwritable_cache_only_costs_time(data_dir, tmp_path, monkeypatch, translations):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory would go")
    monkeypatch.setenv("LEAFE_CACHE", str(blocker))
    env = make("alfworld", data_dir=str(data_dir))
    task = env.make_tasks(1, 0)[0]
    assert play(env, task, APPLE_PLAN)[-1][0] == "You move the apple 1 to the fridge 1."
    assert len(translations) == 2  # the memory cache still serves the reset
