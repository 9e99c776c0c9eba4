"""`leafe train` for each baseline end to end on a tiny Llama, `leafe eval --playbook`, and bad input."""

import json

from helpers import eval_args, leafe


def train_args(method, model, out, *extra):
    return ["train", method, "--model", model, "--out", out, "--tasks", 2, "--task-seed", 40,
            "--max-new-tokens", 8, "--env-param", "max_steps=4",
            # GRPO's own settings are checked before anything else: 8 tasks a step cannot come from 2 tasks
            *(["--tasks-per-step", 2] if method == "grpo" else []), *extra]


def test_train_grpo_writes_a_model_that_eval_loads(tiny_model_dir, tmp_path):
    out = tmp_path / "grpo"
    run = leafe(*train_args("grpo", tiny_model_dir, out, "--steps", 2, "--tasks-per-step", 2, "--group-size", 2,
                            "--device", "cpu"))
    assert run.returncode == 0, run.stderr
    summary = json.loads((out / "train.json").read_text())
    assert summary["method"] == "grpo" and summary["cost"]["env_steps"] >= 8
    assert set(summary["cost"]) == {"env_steps", "generated_tokens", "wall_s", "ran"}
    assert summary["cost"]["ran"] == {"processes": 1, "machines": 1, "sharding": "none", "mixed_precision": "no",
                                      "device": "cpu", "weights_to_engine": "shared"}
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    check = leafe(*eval_args(out, tmp_path / "eval"))
    assert check.returncode == 0, check.stderr


def test_train_ace_then_eval_with_its_playbook(tiny_model_dir, tmp_path):
    out = tmp_path / "ace"
    run = leafe(*train_args("ace", tiny_model_dir, out, "--tasks-per-round", 1, "--epochs", 1,
                            "--reflection-tokens", 16))  # the default, 512, is a reflection a real model writes
    assert run.returncode == 0, run.stderr
    playbook = json.loads((out / "playbook.json").read_text())
    assert playbook["round"] == 2
    check = leafe(*eval_args(tiny_model_dir, tmp_path / "eval", "--playbook", out / "playbook.json"))
    assert check.returncode == 0, check.stderr
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["playbook_lessons"] == len(playbook["lessons"])


def test_train_rejects_bad_input(tiny_model_dir, tmp_path):
    run = leafe(*train_args("ppo", tiny_model_dir, tmp_path / "x"))
    assert run.returncode == 2 and "No such command 'ppo'" in run.stderr
    run = leafe(*train_args("grpo", tmp_path / "missing", tmp_path / "x"))
    assert run.returncode == 2 and "is not a model directory" in run.stderr
    run = leafe(*train_args("grpo", tiny_model_dir, tmp_path / "x", "--group-size", 1))
    assert run.returncode == 2 and "--group-size must be >= 2" in run.stderr
    run = leafe(*train_args("early-experience", tiny_model_dir, tmp_path / "x", "--variant", "xyz"))
    assert run.returncode == 2 and "--variant must be one of iwm, sr" in run.stderr
    run = leafe(*eval_args(tiny_model_dir, tmp_path / "e", "--playbook", tmp_path / "none.json"))
    assert run.returncode == 2 and "does not exist" in run.stderr
    run = leafe(*train_args("grpo", tiny_model_dir, tmp_path / "x", "--backend", "openai", "--base-url",
                            "http://127.0.0.1:9/v1"))
    assert run.returncode == 2 and "grpo needs a rollout engine it can give new weights" in run.stderr
    run = leafe(*eval_args(tiny_model_dir, tmp_path / "e", "--backend", "vllm"))
    assert run.returncode == 2 and "the vllm backend needs vLLM in this Python" in run.stderr
