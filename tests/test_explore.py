"""LEAFE stage 1: the control flow of the three strategies, with scripted policies; resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from helpers import EXPERIENCE_MARK, ScriptedBackend, dancing_explorer, leafe_command, solver_reply

from leafe.envs import make
from leafe.envs.sokoban import SokobanEnv
from leafe.envs.sokoban.oracle import Expert, first_mistake, oracle_experience
from leafe.errors import LeafeError
from leafe.method import Job
from leafe.methods.distill import build_rows
from leafe.methods.explore import explore
from leafe.prompts import REFLECTION_PROMPT
from leafe.rundir import RUN_FORMAT
from leafe.settings import DistillSettings, ExploreSettings
from leafe.trees import read_trees


def run(tokenizer, tmp_path, reply, **settings):
    backend = ScriptedBackend(tokenizer, reply)
    settings = ExploreSettings(**{"tasks": 3, "task_seed": 40, **settings})
    summary = explore(Job("scripted", tmp_path, backend=backend), settings).data
    return summary, read_trees(tmp_path / "trees.jsonl"), backend


def test_leafe_reflects_rolls_back_and_branches_with_the_experience(tiny_tokenizer, tmp_path):
    summary, trees, _ = run(tiny_tokenizer, tmp_path, dancing_explorer("Step: 2\nExperience: stop dancing."),
                            budget=60, reflect_every=5, branch_samples=2, stop_on_success=True)
    assert summary["success_rate"] == 1.0
    for tree in trees:
        root, first, second = tree["nodes"][:3]
        assert root.outcome == "rolled_back" and root.env_steps == 5  # abandoned at the first reflection
        assert root.reflections[0] | {"text": None} == {
            "after_step": 5, "why": "interval", "text": None, "parsed": True, "step": 2,
            "experience": "stop dancing.", "valid": True, "branched": True}
        for branch in (first, second):
            assert (branch.parent, branch.depth, branch.tau, branch.experience) == (0, 1, 2, "stop dancing.")
            assert branch.outcome == "success"
            ids = branch.episode.token_ids
            # h_tau is an exact prefix of the parent's ids; the experience message comes right after it.
            assert ids[: branch.prefix_len] == root.episode.token_ids[: branch.prefix_len]
            assert EXPERIENCE_MARK in tiny_tokenizer.decode(ids[branch.prefix_len : branch.episode.steps[2].action_start])
            assert [s.action for s in branch.episode.steps[:2]] == ["dance", "dance"]
            assert branch.env_steps == len(branch.episode.steps) - 2
        assert tree["branches"] == 2 and tree["branches_succeeded"] == 2
        assert tree["env_steps"] == 5 + 2 * first.env_steps
        assert tree["replayed_steps"] == 0  # rolled back by snapshot
        for branch in (first, second):  # on track, a branch's reflections say "Step: none": no rollback
            assert all(r["step"] is None and not r["valid"] for r in branch.reflections)
    reflections = sum(len(n.reflections) for tree in trees for n in tree["nodes"])
    assert summary["reflections"] == summary["reflections_parsed"] == reflections >= 3


def cf_rows_per_task(trees) -> list[int]:
    """D_cf rows (the default: branches that went on to succeed) each task's tree gives."""
    return [len(build_rows([tree], DistillSettings(reh_fraction=0))[0]) for tree in trees]


def test_without_stop_on_success_a_task_explores_its_whole_budget_and_gives_more_cf_rows(tiny_tokenizer, tmp_path):
    reply = dancing_explorer("Step: 2\nExperience: stop dancing.")
    runs = {stop: run(tiny_tokenizer, tmp_path / str(stop), reply, budget=60, tasks=2, stop_on_success=stop)
            for stop in (True, False)}
    (on, stopped, _), (off, grown, _) = runs[True], runs[False]
    assert on["success_rate"] == off["success_rate"] == 1.0  # the first success comes the same way
    # Stopping: one branching event (2 samples), both winning, then the task ends well within budget.
    assert cf_rows_per_task(stopped) == [2, 2] and all(t["env_steps"] < 60 for t in stopped)
    # The paper's stage 1: after the success a fresh root dances, reflects and branches again, until
    # the budget is spent (sokoban-41's fourth pair of branches runs out of it before winning).
    assert cf_rows_per_task(grown) == [8, 6] and all(t["env_steps"] == 60 for t in grown)
    for tree in grown:
        assert sum(n.parent is None for n in tree["nodes"]) == 4 and "stopped" not in {n.outcome for n in tree["nodes"]}
    # The knob is in the directory's settings (with the run format): a rerun under the other value is refused.
    recorded = json.loads((tmp_path / "True" / "settings.json").read_text())
    assert recorded["stop_on_success"] is True and recorded["format"] == RUN_FORMAT
    with pytest.raises(LeafeError, match="different settings \\(stop_on_success\\)"):
        run(tiny_tokenizer, tmp_path / "True", reply, budget=60, tasks=2)


def test_a_branch_reflects_k_steps_after_its_branch_point(tiny_tokenizer, tmp_path):
    # A branch from tau = 4 has 4 inherited steps; with K = 5 it reflects after 5 steps of its own.
    never = dancing_explorer("Step: 4\nExperience: go another way.", solve_with_experience=False)
    _, trees, _ = run(tiny_tokenizer, tmp_path, never, budget=40, tasks=1, reflect_every=5, branch_samples=1,
                      max_branches=2, max_depth=2)
    root, branch, deeper = trees[0]["nodes"][:3]
    assert [(r["after_step"], r["why"]) for r in root.reflections] == [(5, "interval")]
    assert branch.tau == 4 and [(r["after_step"], r["why"]) for r in branch.reflections] == [(9, "interval")]
    assert branch.env_steps == 5 and branch.outcome == "rolled_back"
    assert (deeper.parent, deeper.tau) == (branch.id, 4)


def test_rollback_by_replay_restores_the_recorded_state_and_counts_it(tiny_tokenizer, tmp_path):
    walk = ["left", "up", "right", "down"]

    def reply(text, i):  # walks about (changing the state) until an experience is in context
        if REFLECTION_PROMPT in text.rsplit("<|im_start|>user", 1)[1]:
            return "Step: none\nExperience: fine." if EXPERIENCE_MARK in text else "Step: 3\nExperience: stop."
        if EXPERIENCE_MARK in text:
            return solver_reply(text)
        return f"Action: {walk[(text.count('<|im_start|>assistant') - 1) % 4]}"

    tasks = {t.task_id: t for t in make("sokoban").make_tasks(3, 40)}
    runs = {}
    for snapshots in (True, False):
        _, trees, _ = run(tiny_tokenizer, tmp_path / str(snapshots), reply, budget=40, branch_samples=1,
                          snapshots=snapshots)
        runs[snapshots] = trees
    for by_snapshot, by_replay in zip(runs[True], runs[False]):
        root, branch = by_replay["nodes"][:2]
        branches = [n for n in by_replay["nodes"] if n.parent is not None]
        assert branch.tau == 3 and branch.replayed_steps == 3 and by_replay["replayed_steps"] == 3 * len(branches)
        assert by_snapshot["replayed_steps"] == 0
        # The branch's first own step acted on the state at step 3 of the root: a fresh env that
        # plays the root's first 3 actions and then the branch's action shows the same observation.
        env = SokobanEnv()
        env.reset(tasks[by_replay["task_id"]])
        for action in root.episode.actions[:3] + [branch.episode.steps[3].action]:
            result = env.step(action)
        assert result.observation == branch.episode.steps[3].observation
        assert [s.observation for s in branch.episode.steps] == [
            s.observation for s in by_snapshot["nodes"][1].episode.steps]


def test_the_budget_is_never_exceeded_and_always_spent_on_failure(tiny_tokenizer, tmp_path):
    never = dancing_explorer(solve_with_experience=False)
    for strategy in ("independent", "refine", "leafe"):
        summary, trees, _ = run(tiny_tokenizer, tmp_path / strategy, never, strategy=strategy, budget=23)
        assert summary["success_rate"] == 0.0
        for tree in trees:
            assert tree["env_steps"] == 23
            assert sum(n.env_steps for n in tree["nodes"]) == 23
    _, trees, _ = run(tiny_tokenizer, tmp_path / "ind", never, strategy="independent", budget=40, tasks=1)
    assert [(n.env_steps, n.outcome) for n in trees[0]["nodes"]] == [(15, "failed"), (15, "failed"), (10, "budget")]
    assert trees[0]["reflections"] == 0


def test_branches_are_served_breadth_first_within_depth_and_branch_limits(tiny_tokenizer, tmp_path):
    never = dancing_explorer("Step: 1\nExperience: try again.", solve_with_experience=False)
    _, trees, _ = run(tiny_tokenizer, tmp_path, never, budget=300, max_depth=2, max_branches=4, tasks=1)
    nodes = trees[0]["nodes"]
    branches = [n for n in nodes if n.parent is not None]
    assert len(branches) == 4
    assert max(n.depth for n in nodes) == 2
    assert [n.depth for n in branches] == sorted(n.depth for n in branches)  # all of depth 1 before depth 2
    for n in branches:
        assert n.parent < n.id and n.depth == nodes[n.parent].depth + 1
    assert trees[0]["env_steps"] == 300  # new roots spend the rest of the budget


def test_unparseable_or_out_of_range_reflections_are_recorded_and_make_no_branch(tiny_tokenizer, tmp_path):
    for reply, valid_parse in (("I am not sure.", False), ("Step: 99\nExperience: too late.", True)):
        out = tmp_path / str(valid_parse)
        summary, trees, _ = run(tiny_tokenizer, out, dancing_explorer(reply), budget=15, tasks=1, reflect_every=5)
        assert summary["branches"] == 0
        reflections = trees[0]["nodes"][0].reflections
        assert [r["after_step"] for r in reflections] == [5, 10]  # none at 15: no budget left to use it
        assert all(r["parsed"] == valid_parse and not r["valid"] and not r["branched"] for r in reflections)
        assert trees[0]["nodes"][0].outcome == "failed"


def test_refine_restarts_with_every_experience_so_far_in_context(tiny_tokenizer, tmp_path):
    lessons = iter(f"Step: 0\nExperience: lesson {i}." for i in range(100))
    never = dancing_explorer(solve_with_experience=False)

    def reply(text, i):
        out = never(text, i)
        return next(lessons) if out.startswith("Step:") else out

    _, trees, _ = run(tiny_tokenizer, tmp_path, reply, strategy="refine", budget=45, tasks=1)
    nodes = trees[0]["nodes"]
    assert [n.context_experiences for n in nodes] == [[], ["lesson 0."], ["lesson 0.", "lesson 1."]]
    assert all(n.parent is None for n in nodes)
    text = tiny_tokenizer.decode(nodes[2].episode.token_ids[: nodes[2].episode.steps[0].context_len])
    assert text.count(EXPERIENCE_MARK) == 2
    _, solved, _ = run(tiny_tokenizer, tmp_path / "solves", dancing_explorer(), strategy="refine", budget=60, tasks=2,
                       stop_on_success=True)
    assert all(t["success"] and len(t["nodes"]) == 2 for t in solved)


def test_tree_records_follow_the_schema_and_resume_refuses_other_settings(tiny_tokenizer, tmp_path):
    summary, trees, backend = run(tiny_tokenizer, tmp_path, dancing_explorer(), budget=30)
    assert set(summary) >= {"strategy", "tasks", "budget", "success_rate", "ci95", "env_steps", "replayed_steps",
                            "generated_tokens", "prefill_tokens", "reflections", "reflections_parsed", "branches",
                            "branches_succeeded", "wall_s"}
    raw = [json.loads(line) for line in (tmp_path / "trees.jsonl").read_text().splitlines()]
    assert len(raw) == 3 and {r["task_id"] for r in raw} == {f"sokoban-{i}" for i in range(40, 43)}
    node = raw[0]["nodes"][1]
    assert set(node) >= {"id", "parent", "depth", "tau", "prefix_len", "experience", "reflection", "episode",
                         "outcome", "reflections", "env_steps", "replayed_steps", "generated_tokens", "wall_s"}
    assert summary["generated_tokens"] == backend.stats.generated_tokens
    calls = backend.stats.calls
    again = explore(Job("scripted", tmp_path, backend=backend), ExploreSettings(tasks=3, task_seed=40, budget=30)).data
    assert backend.stats.calls == calls and again["tasks"] == 3  # everything was done: nothing rerun
    with pytest.raises(LeafeError, match="different settings \\(budget\\)"):
        explore(Job("scripted", tmp_path, backend=backend), ExploreSettings(tasks=3, task_seed=40, budget=31))


def test_settings_are_validated():
    with pytest.raises(LeafeError, match="unknown --strategy 'tree'"):
        ExploreSettings(strategy="tree").validate()
    with pytest.raises(LeafeError, match="--budget must be >= 1"):
        ExploreSettings(budget=0).validate()
    with pytest.raises(LeafeError, match="unknown --reflector 'self'"):
        ExploreSettings(reflector="self").validate()
    with pytest.raises(LeafeError, match="env 'code' has no oracle to reflect with; use --reflector policy"):
        ExploreSettings(env="code", reflector="oracle").validate()


def test_the_oracle_reflector_branches_at_the_first_irreversible_mistake(tiny_tokenizer, tmp_path):
    # The dancing policy wastes moves until too few are left: the oracle names that step, never asks
    # the model, and its experience (the solver's move there) leads the branches to success.
    def reply(text: str, i: int) -> str:
        assert REFLECTION_PROMPT not in text, "the oracle reflects; the model must not be asked"
        return dancing_explorer()(text, i)

    summary, trees, _ = run(tiny_tokenizer, tmp_path, reply, budget=60, reflector="oracle")
    assert summary["success_rate"] == 1.0
    tasks = {t.task_id: t for t in SokobanEnv(max_steps=15).make_tasks(3, 40)}
    assert {tree["task_id"] for tree in trees} == set(tasks)
    for tree in trees:
        expert = Expert.of(tasks[tree["task_id"]], 15)
        root = tree["nodes"][0]
        truth = first_mistake(expert, root.episode.actions)
        assert truth == 15 - expert.table[expert.start]  # the first dance that leaves too few moves
        named = [r for r in root.reflections if r["step"] is not None]
        assert named and all(r["step"] == first_mistake(expert, root.episode.actions[: r["after_step"]]) for r in named)
        assert all(r["step"] is None for r in root.reflections if r["after_step"] <= truth)
        branches = [n for n in tree["nodes"] if n.parent == 0]
        assert {b.tau for b in branches} == {truth}
        assert branches[0].experience == oracle_experience(expert, root.episode.actions, truth)
        assert any(b.outcome == "success" for b in branches)
        # Reflections cost no generated tokens: the root's are its actions' alone.
        assert root.generated_tokens == root.episode.generated_tokens


def test_kill_9_mid_run_then_rerun_loses_and_duplicates_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cmd = leafe_command("explore", "--model", str(tiny_model_dir), "--tasks", "6", "--task-seed", "70", "--budget", "8",
               "--max-new-tokens", "6", "--reflection-tokens", "8", "--parallel-tasks", "1", "--out", str(out))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    trees = out / "trees.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (trees.exists() and trees.read_text().count("\n") >= 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = trees.read_text().count("\n")
    assert 2 <= written < 6, proc.stderr.read().decode()[-2000:]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in trees.read_text().splitlines()]
    assert sorted(r["task_id"] for r in records) == [f"sokoban-{i}" for i in range(70, 76)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"] == 6 and summary["env_steps"] == sum(r["env_steps"] for r in records)
    assert len({r["session"]["id"] for r in records}) == 2

    shown = subprocess.run(leafe_command("show-tree", str(trees), "--task", "sokoban-71"), capture_output=True, text=True)
    assert shown.returncode == 0 and "sokoban-71" in shown.stdout and "#0 root episode" in shown.stdout
    missing = subprocess.run(leafe_command("show-tree", str(trees), "--task", "nope"), capture_output=True, text=True)
    assert missing.returncode == 2 and "no tree for task 'nope'" in missing.stderr


def test_a_task_whose_prompt_outgrows_the_context_ends_instead_of_looping(tiny_tokenizer, tmp_path):
    backend = ScriptedBackend(tiny_tokenizer, dancing_explorer(), max_context=100)
    summary = explore(Job("scripted", tmp_path, backend=backend), ExploreSettings(tasks=2, task_seed=40, budget=30)).data
    trees = read_trees(tmp_path / "trees.jsonl")
    assert summary["env_steps"] == 0 and all(t["nodes"][0].outcome == "context" for t in trees)
    assert all(len(t["nodes"]) == 1 for t in trees)
