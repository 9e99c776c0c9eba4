"""`leafe eval` end to end on a tiny random Llama, and its answers to bad input."""

import json

import pytest
from helpers import eval_args, leafe, one_line_error


def test_eval_writes_passk_and_resumes_without_redoing_work(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    run = leafe(*eval_args(tiny_model_dir, out))
    assert run.returncode == 0, run.stderr
    assert "Pass@k" in run.stdout
    result = json.loads((out / "eval.json").read_text())
    for key in ("model", "env", "samples", "temperature", "pass_at_k", "ci95", "tasks", "env_steps",
                "generated_tokens", "wall_s"):
        assert key in result
    assert list(result["pass_at_k"]) == ["1", "2", "4"]
    assert [t["task_id"] for t in result["tasks"]] == ["sokoban-1000", "sokoban-1001", "sokoban-1002"]
    assert all(t["n"] == 4 and 0 <= t["c"] <= 4 for t in result["tasks"])
    assert result["env_steps"] >= 3 * 4  # every episode takes at least one step
    lines = (out / "eval_tasks.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 3

    again = leafe(*eval_args(tiny_model_dir, out))
    assert again.returncode == 0, again.stderr
    assert (out / "eval_tasks.jsonl").read_text().splitlines() == lines  # nothing re-run
    assert json.loads((out / "eval.json").read_text())["tasks"] == result["tasks"]


def test_eval_resumes_a_partial_run(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    assert leafe(*eval_args(tiny_model_dir, out)).returncode == 0
    progress = out / "eval_tasks.jsonl"
    lines = progress.read_text().splitlines()
    progress.write_text("\n".join(lines[:2]) + "\n" + lines[2][:17])  # killed while writing task 2
    run = leafe(*eval_args(tiny_model_dir, out))
    assert run.returncode == 0, run.stderr
    records = [json.loads(x) for x in progress.read_text().splitlines()]
    assert [r.get("task_id") for r in records[1:]].count("sokoban-1000") == 1
    assert sorted(r["task_id"] for r in records[1:]) == ["sokoban-1000", "sokoban-1001", "sokoban-1002"]


def test_bad_input_gets_one_clear_line(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    one_line_error(leafe(*eval_args(tmp_path / "missing", out)), "does not exist")
    one_line_error(leafe(*eval_args(tiny_model_dir, out, "--k", "1,8")), "--samples must be >= max k (got 4 < 8)")
    one_line_error(leafe(*eval_args(tiny_model_dir, out, "--env", "chess")), "unknown env 'chess'")
    bad = tmp_path / "bad.xsb"
    bad.write_text("#####\n#@$$.#\n#####\n")
    one_line_error(leafe(*eval_args(tiny_model_dir, out, "--env-param", f"levels={bad}")), "2 boxes but 1 goals")
    one_line_error(leafe(*eval_args(tiny_model_dir, out, "--env-param", "colour")), "key=value")


def test_resuming_with_other_settings_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    assert leafe(*eval_args(tiny_model_dir, out)).returncode == 0
    one_line_error(leafe(*eval_args(tiny_model_dir, out, "--temperature", "0.5")), "different settings (temperature)")


@pytest.mark.parametrize("args", [["--help"], ["eval", "--help"]])
def test_help(args):
    run = leafe(*args)
    assert run.returncode == 0 and "Usage" in run.stdout
