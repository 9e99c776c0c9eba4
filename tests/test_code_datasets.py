"""The code env's data sets on their real data (MBPP, APPS in ../shared/data, read in place) and on
CodeContests rows in the hub's schema written here; `leafe eval` on MBPP with four feedback turns."""

from __future__ import annotations

import json

import pytest
from helpers import SHARED_DATA, leafe

from leafe.envs import check_params, make
from leafe.envs.base import EnvError
from leafe.envs.code import judge, load_problems
from leafe.envs.code.datasets import function_under_test, split_arguments

MBPP = SHARED_DATA / "mbpp"
APPS = SHARED_DATA / "apps"
needs_mbpp = pytest.mark.skipif(not (MBPP / "mbpp.jsonl").is_file(),
                                reason=f"MBPP is not at {MBPP} (set LEAFE_SHARED_DATA to the folder holding mbpp/)")
needs_apps = pytest.mark.skipif(not (APPS / "selected150.jsonl").is_file(),
                                reason=f"APPS's selection is not at {APPS} (set LEAFE_SHARED_DATA)")


# -- MBPP ----------------------------------------------------------------------------------------
@needs_mbpp
def test_mbpp_shows_the_text_and_first_assert_and_a_sample_of_references_is_accepted():
    problems = load_problems("mbpp", MBPP)
    assert len(problems) == 974 and problems[0]["id"] == "mbpp-1"
    first = problems[0]
    assert first["statement"].endswith("Your code should pass this test:\n"
                                       "assert min_cost([[1, 2, 3], [4, 8, 2], [1, 5, 3]], 2, 2) == 8")
    assert first["entry_point"] == "min_cost" and len(first["public_tests"]) == 1 and len(first["private_tests"]) == 2
    for p in problems[::49]:  # 20 references, spread over the set
        verdict = judge(p["solutions"][0], p["public_tests"] + p["private_tests"])
        assert verdict.status == "accepted", (p["id"], verdict.feedback)


@needs_mbpp
def test_mbpp_setup_code_runs_before_each_assert_and_is_shown():
    (tree,) = [p for p in load_problems("mbpp", MBPP / "mbpp.jsonl") if p["id"] == "mbpp-367"]
    assert "root = Node(1)" in tree["statement"] and "root = Node(1)" in tree["private_tests"][0]["code"]
    assert judge(tree["solutions"][0], tree["public_tests"] + tree["private_tests"]).passed


def test_the_function_under_test_is_the_first_call_of_a_non_builtin():
    assert function_under_test("assert set(similar_elements((3, 4), (5, 4))) == set((4,))") == "similar_elements"
    assert function_under_test("assert math.isclose(area(2), 12.56, rel_tol=0.01)") == "area"
    assert function_under_test("assert sum(10,15) == 6") == "sum"  # MBPP 126 names its function sum


@needs_mbpp
def test_an_mbpp_episode_gets_the_failing_assert_as_feedback(monkeypatch):
    monkeypatch.setenv("MBPP_DATA", str(MBPP))
    env = make("code", dataset="mbpp")
    task = env.make_tasks(1, 1)[0]
    assert task.task_id == "code-mbpp-2"
    assert env.reset(task) == "1 visible test. No submission yet."
    assert "the test shown calls it" in env.instruction and "assert similar_elements(" in env.instruction
    step = env.step("def similar_elements(a, b):\n    return ()\n")
    assert step.info["status"] == "wrong_answer" and "Test:\nassert similar_elements((3, 4, 5, 6)" in step.observation
    assert step.observation.endswith("3 submissions left.")
    step = env.step(env.parse_action(env.expert_actions(task)[0]))
    assert step.success and step.done


def test_named_sets_without_their_data_are_one_line_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("MBPP_DATA", raising=False)
    with pytest.raises(EnvError, match="dataset=mbpp needs its data: pass --env-param data_dir=PATH .* or set MBPP_DATA"):
        check_params("code", {"dataset": "mbpp"})
    with pytest.raises(EnvError, match="holds none of selected150.jsonl, test.jsonl"):
        load_problems("apps", tmp_path)


# -- APPS ----------------------------------------------------------------------------------------
QAQ = """s = input().strip()
q = a = total = 0
for c in s:
    if c == "Q":
        total += a
        q += 1
    elif c == "A":
        a += q
print(total)
"""
STRIP_COMMENTS = """def solution(string, markers):
    lines = string.split("\\n")
    for m in markers:
        lines = [line.split(m)[0] for line in lines]
    return "\\n".join(line.rstrip() for line in lines)
"""


@needs_apps
def test_apps_stdin_and_call_based_problems_accept_correct_programs():
    problems = {p["id"]: p for p in load_problems("apps", APPS)}
    assert len(problems) == 128  # the 150 rows repeat 22 problems; each is read once
    assert {p["format"] for p in problems.values()} == {"stdio", "call"}
    for pid, source in [("apps-1607", QAQ), ("apps-1613", STRIP_COMMENTS),
                        ("apps-4465", "def super_size(n):\n    return int(''.join(sorted(str(n), reverse=True)))\n")]:
        p = problems[pid]
        tests = p["public_tests"] + p["private_tests"][:8]  # apps-1607 has 43 tests; the first ten will do
        assert judge(source, tests).status == "accepted", pid
    # a call-based wrong answer quotes the call, the expected and the returned value
    verdict = judge("def super_size(n):\n    return n\n", problems["apps-4465"]["public_tests"])
    assert verdict.feedback.startswith("Wrong answer on test 1.\nCall:\nsuper_size(")
    assert "Expected:\n" in verdict.feedback and "Got:\n" in verdict.feedback


def test_call_based_inputs_are_one_argument_a_line():
    assert split_arguments("[1, 2]\nabc\n4.5\ntrue", 4) == [[1, 2], "abc", 4.5, True]
    assert split_arguments("line one\nline two\n['#']", 2) == ["line one\nline two", ["#"]]
    assert split_arguments("", 0) == []


def test_apps_release_rows_with_a_solution_class_and_stdin_problems(tmp_path):
    rows = [
        {"problem_id": 7, "question": "Add two numbers.", "starter_code": "class Solution:\n    def add(self, a, b):\n",
         "input_output": json.dumps({"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]]}),
         "solutions": json.dumps(["class Solution:\n    def add(self, a, b):\n        return a + b\n"])},
        {"problem_id": 8, "question": "Print a + b.", "starter_code": "",
         "input_output": json.dumps({"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]}),
         "solutions": json.dumps(["print(sum(map(int, input().split())))\n"])},
    ]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = load_problems("apps", tmp_path)
    assert [p["format"] for p in problems] == ["call", "stdio"]
    assert problems[0]["public_tests"][0]["call"] == "Solution().add"
    for p in problems:
        assert judge(p["solutions"][0], p["public_tests"] + p["private_tests"]).passed, p["id"]


# -- CodeContests --------------------------------------------------------------------------------
def contest_row(name: str) -> dict:
    """A row in the hub schema of deepmind/code_contests (the fields the loader reads, and a few it does not)."""
    return {
        "name": name, "description": "Given n, print 2n.\n\nExample\nInput\n3\nOutput\n6",
        "public_tests": {"input": ["3\n"], "output": ["6\n"]},
        "private_tests": {"input": ["10\n"], "output": ["20\n"]},
        "generated_tests": {"input": ["0\n", "7\n"], "output": ["0\n", "14\n"]},
        "solutions": {"language": [2, 3], "solution": ["int main(){}", "print(2 * int(input()))\n"]},
        "incorrect_solutions": {"language": [3], "solution": ["print(int(input()) + 2)\n"]},
        "source": 2, "difficulty": 7, "cf_contest_id": 1, "cf_index": "A", "cf_points": 500.0, "cf_rating": 800,
        "cf_tags": ["math"], "is_description_translated": False, "untranslated_description": "",
        "time_limit": {"seconds": 1, "nanos": 0}, "memory_limit_bytes": 256000000, "input_file": "", "output_file": "",
    }


def test_codecontests_public_tests_give_feedback_and_all_tests_judge(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(contest_row("1000_A. Double It")) + "\n")
    env = make("code", dataset="codecontests", data_dir=str(path))
    (task,) = env.make_tasks(1, 0)
    assert task.task_id == "code-1000_A.-Double-It"
    assert env.reset(task) == "Example 1:\nInput:\n3\nOutput:\n6\nNo submission yet."
    assert len(task.spec["private_tests"]) == 3  # private + generated
    assert env.expert_actions(task) == ["```python\nprint(2 * int(input()))\n```"]  # the Python 3 solution
    step = env.step("n = int(input())\nprint(6 if n == 3 else n + 2)\n")  # passes the public test only
    assert step.info["status"] == "wrong_answer" and "hidden test failed" in step.observation
    assert "20" not in step.observation
    assert env.step("print(2 * int(input()))\n").success


def test_codecontests_parquet_folder_of_one_split(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([contest_row("1_A. One"), contest_row("2_B. Two")]),
                   tmp_path / "test-00000-of-00001.parquet")
    problems = load_problems("codecontests", tmp_path)
    assert [p["id"] for p in problems] == ["1_A.-One", "2_B.-Two"]
    assert judge(problems[0]["solutions"][0], problems[0]["public_tests"] + problems[0]["private_tests"]).passed
    (tmp_path / "train-00000-of-00039.parquet").write_bytes((tmp_path / "test-00000-of-00001.parquet").read_bytes())
    with pytest.raises(EnvError, match="several splits"):
        load_problems("codecontests", tmp_path)


# -- the CLI -------------------------------------------------------------------------------------
@needs_mbpp
def test_eval_on_mbpp_runs_four_feedback_turns(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    run = leafe("eval", "--model", tiny_model_dir, "--out", out, "--env", "code", "--env-param", "dataset=mbpp",
                "--env-param", f"data_dir={MBPP}", "--env-param", "max_submissions=4", "--tasks", 1, "--task-seed", 10,
                "--samples", 2, "--max-new-tokens", 8, "--save-episodes")
    assert run.returncode == 0, run.stderr
    result = json.loads((out / "eval.json").read_text())
    assert [t["task_id"] for t in result["tasks"]] == ["code-mbpp-11"]  # MBPP's test split starts here
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 2 and all(len(e["steps"]) == 4 for e in episodes)  # a random model never passes
    assert [s["observation"].splitlines()[-1] for s in episodes[0]["steps"]] == [
        "3 submissions left.", "2 submissions left.", "1 submission left.", "No submissions left."]
