"""LEAFE stage 1 end to end on the real text games: a scripted agent fails, reflects, the env is rolled
back (TextWorld by snapshot, ScienceWorld by verified replay) and the branch that follows the
experience wins. Control flow is scripted; the games, rollback and hashes are real."""

from __future__ import annotations

import shutil

import pytest
from helpers import ScriptedBackend, scripted_explorer

from leafe.envs import make
from leafe.method import Job
from leafe.methods.explore import explore
from leafe.settings import ExploreSettings
from leafe.trees import read_trees

CASES = {
    "textworld": ({}, "look"),
    "scienceworld": ({"tasks": "find-non-living-thing", "split": "dev"}, "look around"),
}


@pytest.mark.parametrize("env_name", list(CASES))
def test_leafe_rolls_back_a_real_text_game_and_the_branch_wins(env_name, tiny_tokenizer, tmp_path, monkeypatch):
    pytest.importorskip(env_name)
    if env_name == "scienceworld" and shutil.which("java") is None:
        pytest.skip("ScienceWorld needs Java")
    monkeypatch.setenv("LEAFE_CACHE", str(tmp_path / "cache"))
    params, idle = CASES[env_name]
    params = {**params, "max_steps": 6}
    env = make(env_name, **params)
    task = env.make_tasks(1, 0)[0]
    expert = env.expert_actions(task)
    assert len(expert) <= 5  # the branch starts at step 1 and has 5 steps left
    backend = ScriptedBackend(tiny_tokenizer, scripted_explorer(lambda text: expert, idle))
    settings = ExploreSettings(env=env_name, env_params=params, tasks=1, task_seed=0, budget=20, reflect_every=6,
                               branch_samples=1, max_depth=1, stop_on_success=True)
    explore(Job("scripted", tmp_path / "explore", backend=backend), settings)
    (tree,) = read_trees(tmp_path / "explore" / "trees.jsonl")
    assert tree["success"] and tree["branches"] == tree["branches_succeeded"] == 1
    root, branch = tree["nodes"][:2]
    assert not root.episode.success and [s.action for s in root.episode.steps] == [idle] * 6
    assert branch.tau == 1 and branch.episode.success
    assert [s.action for s in branch.episode.steps] == [idle] + expert
    # Rollback kind: TextWorld restores a snapshot; ScienceWorld re-plays (and hash-checks) step 0.
    assert branch.replayed_steps == (0 if env.supports_snapshot else 1)
