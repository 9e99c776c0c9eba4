"""The alfworld env on ALFWorld's real games: the evaluation splits as ALFWorld lists them, the expert
winning, rollback by replay, and LEAFE stage 1 end to end with a scripted agent.

Reads the games in place from `../shared/data/alfworld` beside the checkout (the layout
`alfworld-download` leaves under $ALFWORLD_DATA); skipped when that folder is absent. Every test
shares one translation cache (in a temp dir), as the processes of a study share leafe's.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import ScriptedBackend, scripted_explorer

pytest.importorskip("textworld")
pytest.importorskip("alfworld")

from leafe.envs import make, observation_hash, replay  # noqa: E402
from leafe.envs.alfworld import game_files  # noqa: E402
from leafe.method import Job  # noqa: E402
from leafe.methods.explore import explore  # noqa: E402
from leafe.settings import ExploreSettings  # noqa: E402
from leafe.trees import read_trees  # noqa: E402

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DATA = SHARED / "alfworld"
pytestmark = pytest.mark.skipif(not (DATA / "json_2.1.1" / "valid_unseen").is_dir(),
                                reason=f"ALFWorld's games are not at {DATA} (run alfworld-download and copy json_2.1.1 there)")
TASK_TYPES = {"look_at_obj_in_light", "pick_and_place_simple", "pick_clean_then_place_in_recep",
              "pick_cool_then_place_in_recep", "pick_heat_then_place_in_recep", "pick_two_obj_and_place"}


@pytest.fixture(scope="module")
def qwen_tokenizer():
    """Qwen2.5's real tokenizer and ChatML template (no weights): quicker to load than to build one."""
    if not (SHARED / "tokenizers" / "qwen2.5").is_dir():
        pytest.skip(f"no Qwen2.5 tokenizer at {SHARED / 'tokenizers' / 'qwen2.5'}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "qwen2.5")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("leafe-cache")


@pytest.fixture(autouse=True)
def shared_cache(cache, monkeypatch):
    monkeypatch.setenv("LEAFE_CACHE", str(cache))


def unseen(**params):
    return make("alfworld", data_dir=str(DATA), split="valid_unseen", **params)


def test_the_evaluation_splits_are_alfreds_140_seen_and_134_unseen_games_of_six_task_types():
    assert len(game_files(DATA, "valid_seen")) == 140 and len(game_files(DATA, "valid_unseen")) == 134
    tasks = unseen().make_tasks(134, 0)
    assert {t.spec["task_type"] for t in tasks} == TASK_TYPES
    assert tasks[0].spec["game"].startswith("json_2.1.1/valid_unseen/look_at_obj_in_light-AlarmClock-None-DeskLamp-308/")


def first_of(task_type: str):
    return next(t for t in unseen().make_tasks(134, 0) if t.spec["task_type"] == task_type)


def test_the_walkthrough_wins_a_real_game_and_replay_restores_its_middle():
    env = unseen()
    task = first_of("pick_heat_then_place_in_recep")  # among the longest: take, heat in the microwave, place
    expert = env.expert_actions(task)
    hashes = [observation_hash(env.reset(task))]
    results = [env.step(action) for action in expert]
    hashes += [observation_hash(r.observation) for r in results]
    assert not any(r.info["invalid"] for r in results) and not any(r.done for r in results[:-1])
    assert results[-1].success and results[-1].reward == 1.0
    # Rolled back to the middle in a fresh env (as a branch is): the same observation, and the rest wins.
    half = len(expert) // 2
    fresh = unseen()
    assert replay(fresh, task, expert[:half], hashes[:half + 1]) == results[half - 1].observation
    assert [fresh.step(a).success for a in expert[half:]][-1]


def test_leafe_stage_1_rolls_back_real_alfworld_games_and_the_branches_win(qwen_tokenizer, tmp_path):
    params = {"data_dir": str(DATA), "split": "valid_unseen", "max_steps": 5}
    env = make("alfworld", **params)
    tasks = env.make_tasks(2, 1)  # two rooms, two goals; walkthroughs of 4 and 3 steps
    expert = {env.reset(t) and env.instruction.rsplit("Your task is to: ", 1)[1]: env.expert_actions(t) for t in tasks}
    assert len(expert) == 2 and all(len(e) <= 4 for e in expert.values())  # a branch at step 1 has 4 steps left

    def expert_of(text: str) -> list[str]:
        return expert[re.search(r"Your task is to: ([^\n<]*)", text).group(1)]

    backend = ScriptedBackend(qwen_tokenizer, scripted_explorer(expert_of, "look"))
    settings = ExploreSettings(env="alfworld", env_params=params, tasks=2, task_seed=1, budget=20, reflect_every=5,
                               branch_samples=1, max_depth=1, stop_on_success=True)
    explore(Job("scripted", tmp_path / "explore", backend=backend), settings)
    trees = sorted(read_trees(tmp_path / "explore" / "trees.jsonl"), key=lambda t: t["task_id"])
    assert [t["task_id"] for t in trees] == ["alfworld-valid_unseen-1", "alfworld-valid_unseen-2"]
    for tree, goal in zip(trees, expert):
        assert tree["success"] and tree["branches"] == tree["branches_succeeded"] == 1
        root, branch = tree["nodes"][:2]
        assert not root.episode.success and [s.action for s in root.episode.steps] == ["look"] * 5
        assert branch.tau == 1 and branch.episode.success
        assert [s.action for s in branch.episode.steps] == ["look"] + expert[goal]
        assert branch.replayed_steps == 1  # no snapshot: reset, then step 0 re-played and hash-checked
