"""The code env: datasets, submissions judged in the sandbox, hidden tests, rollback; `leafe judge`."""

from __future__ import annotations

import json

import pytest
from helpers import leafe

from leafe.envs import make
from leafe.envs.base import EnvError
from leafe.envs.code import extract_program, judge, load_problems
from leafe.envs.code.datasets import docstring_examples


def test_every_shipped_problem_is_solved_by_its_reference_and_rejects_a_wrong_program():
    problems = load_problems("leafe")
    assert len(problems) >= 10 and len({p["id"] for p in problems}) == len(problems)
    for p in problems:
        tests = p["public_tests"] + p["private_tests"]
        assert judge(p["solutions"][0], tests).status == "accepted", p["id"]
        assert not judge("print(0)\n", tests).passed, p["id"]


def test_an_episode_fails_then_is_accepted_and_hidden_tests_stay_hidden():
    env = make("code", max_submissions=3)
    (task,) = [t for t in env.make_tasks(12, 0) if t.task_id == "code-second-largest"]
    first = env.reset(task)
    assert "Example 1:\nInput:\n5\n3 1 4 1 5\nOutput:\n4" in first and "second largest" in env.instruction
    # Passes both public tests but not the hidden "1\n42" case: told so, without the hidden input.
    naive = "input()\nv = sorted(set(map(int, input().split())))\nprint(v[-2] if len(v) > 1 else -1 if v[0] == 7 else v[0])\n"
    step = env.step(naive)
    assert not step.done and not step.success and step.info["status"] == "wrong_answer"
    assert "All 2 public tests passed. But a hidden test failed (wrong answer).\n2 submissions left." == step.observation
    assert "42" not in step.observation
    step = env.step("print(")
    assert step.info["status"] == "syntax_error" and step.observation.endswith("\n1 submission left.")
    snapshot = env.snapshot()
    step = env.step(env.parse_action(f"Thought: fix it.\n```python\n{task.spec['solutions'][0]}```"))
    assert step.done and step.success and step.reward == 1.0 and step.observation.startswith("Accepted")
    env.restore(snapshot)  # rollback: one submission left again
    assert env.step("print(1)\n").observation.endswith("No submissions left.")


def test_the_rollout_hands_the_env_the_whole_program():
    reply = "Thought: read, then add.\nAction:\n```python\nimport sys\nprint(sum(map(int, sys.stdin.read().split())))\n```"
    env = make("code")
    assert env.parse_action(reply) == "import sys\nprint(sum(map(int, sys.stdin.read().split())))\n"
    assert extract_program("Action:\nprint(1)\nprint(2)") == "print(1)\nprint(2)\n"
    assert extract_program("```py\nA\n```\nthen\n```python\nB\n```") == "B\n"


def test_humaneval_problems_load_with_visible_examples_and_canonical_solutions_pass():
    problems = load_problems("humaneval")
    assert len(problems) == 164
    with_examples = [p for p in problems if p["public_tests"]]
    assert len(with_examples) >= 100  # >>> examples and "f(x) == y" lines
    for p in problems[:8]:
        assert judge(p["solutions"][0], p["public_tests"] + p["private_tests"]).status == "accepted", p["id"]
    env = make("code", dataset="humaneval")
    task = env.make_tasks(1, 2)[0]
    env.reset(task)
    assert "def truncate_number" in env.instruction
    step = env.step("def truncate_number(number):\n    return number\n")
    assert step.info["status"] == "wrong_answer" and "truncate_number(3.5)" in step.observation


def test_docstring_examples_become_asserts():
    prompt = 'def f(x):\n    """\n    >>> f(2)\n    4\n    f(3) == 9\n    f(1) ➞ 1\n    >>> f(\n    """\n'
    assert docstring_examples(prompt, "f") == [
        "assert (f(2)) == (4), 'f(2) should be 4'",
        "assert (f(3)) == (9), 'f(3) should be 9'",
        "assert (f(1)) == (1), 'f(1) should be 1'",
    ]


def test_bad_datasets_and_task_ranges_are_one_line_errors(tmp_path):
    with pytest.raises(EnvError, match="unknown code dataset 'nope'"):
        load_problems("nope")
    with pytest.raises(EnvError, match="need network access"):
        load_problems("deepmind/code_contests")
    with pytest.raises(EnvError, match="has 12 problems; asked for 5 from index 10"):
        make("code").make_tasks(5, 10)
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"id": "x", "statement": "s"}) + "\n")
    with pytest.raises(EnvError, match="problem x lacks private_tests, public_tests"):
        load_problems(str(bad))


def test_judge_command_prints_the_verdict(tmp_path):
    problem = load_problems("leafe")[0]
    (tmp_path / "p.json").write_text(json.dumps(problem))
    (tmp_path / "ok.py").write_text(problem["solutions"][0])
    (tmp_path / "bad.py").write_text("print(0)\n")
    run = leafe("judge", "--problem", tmp_path / "p.json", "--solution", tmp_path / "ok.py")
    assert run.returncode == 0, run.stderr
    verdict = json.loads(run.stdout)
    assert verdict["passed"] and verdict["status"] == "accepted"
    assert len(verdict["tests"]) == len(problem["public_tests"]) + len(problem["private_tests"])
    run = leafe("judge", "--problem", tmp_path / "p.json", "--solution", tmp_path / "bad.py", "--tests", "public")
    assert run.returncode == 0 and json.loads(run.stdout)["status"] == "wrong_answer"
    run = leafe("judge", "--problem", tmp_path / "none.json", "--solution", tmp_path / "ok.py")
    assert run.returncode == 2 and "does not exist" in run.stderr


def test_judge_names_the_tests_a_problem_lacks(tmp_path):
    (tmp_path / "ok.py").write_text("print(0)\n")
    public_only, none = tmp_path / "public_only.json", tmp_path / "none.json"
    public_only.write_text(json.dumps({"public_tests": [{"input": "", "output": "0\n"}]}))
    none.write_text(json.dumps({"description": "a problem without tests"}))
    for problem, tests, says in ((public_only, "private", "has no private tests"), (none, "all", "has no tests (")):
        run = leafe("judge", "--problem", problem, "--solution", tmp_path / "ok.py", "--tests", tests)
        assert run.returncode == 2 and f"{problem} {says}" in run.stderr, run.stderr
