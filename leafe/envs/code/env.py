"""Program synthesis with execution feedback (the paper's CodeContests setting), and its judge.

The agent submits a whole Python program; the env judges it on the problem's public tests and
answers with a verdict: the first failing input with expected and actual output, or the error and
the tail of its traceback. When the public tests pass, the hidden tests decide success (their
content is never shown). At most `max_submissions` submissions per episode; the paper's setting,
and the default, is 4: the first attempt and up to three more, each after execution feedback.

The problem format and the data sets (leafe, HumanEval, MBPP, APPS, CodeContests) are in
`datasets`: tests are stdin/stdout pairs, assert snippets run after the submission, or calls
of the submission's function (APPS's call-based problems).

Every submission runs in `sandbox.Sandbox` (bubblewrap + rlimits); see that module. A run may write
twice its expected output plus 64 KiB (at least 1 MiB) before it is stopped as `output_limit`.

When the sandbox itself fails (after its own retries), the verdict is `sandbox_error`: it says
nothing about the program, so the env never turns it into feedback or a reward but raises `EnvFault`,
and the rollout runs the episode again (`leafe.rollout`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from leafe.envs.base import DataStatus, Env, EnvError, EnvFault, StepResult, Task
from leafe.envs.code.datasets import NAMES, dataset_status, load_problems
from leafe.envs.code.sandbox import Limits, Outcome, Sandbox, SandboxFault
from leafe.envs.registry import register

#: The program's verdicts, then the judge's own: `sandbox_error`, the sandbox failed to run it.
STATUSES = ("accepted", "wrong_answer", "runtime_error", "syntax_error", "time_limit", "memory_limit", "output_limit",
            "sandbox_error")
#: What to do when the sandbox keeps failing (the stage's last line, `leafe.rollout.EnvUnavailable`).
SANDBOX_HINT = ("check that bubblewrap can make its namespaces here (`bwrap --unshare-all true`; "
                "user.max_user_namespaces), and that the machine has processes, memory and space in $TMPDIR to "
                "spare; then rerun the stage, which resumes from what it saved")
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
    """Run `source` on each test (stdin/stdout tests: {"input", "output"}; function tests: {"code"}).
    `sandbox_error` when the sandbox failed to run it on every try: the judge's verdict, not the program's."""
    if not tests:
        raise EnvError("judge() needs at least one test")
    syntax = _syntax_error(source)
    if syntax is not None:
        return Verdict(False, "syntax_error", syntax)
    sandbox = sandbox or default_sandbox()
    python = [sandbox.interpreter, "-I"]  # isolated: no user site, no PYTHON* variables
    results: list[dict[str, Any]] = []
    first_failure: Verdict | None = None
    for i, test in enumerate(tests, 1):
        limits = Limits(time_s=time_limit_s, memory_mb=memory_mb, output_bytes=output_cap(test))
        try:
            if "code" in test:
                outcome = sandbox.run([*python, "main.py"], files={"main.py": f"{source}\n\n{test['code']}\n"},
                                      limits=limits)
            elif "call" in test:
                outcome = sandbox.run([*python, "main.py"], files={"main.py": f"{source}\n\n{call_harness(test)}"},
                                      limits=limits)
            else:
                outcome = sandbox.run([*python, "main.py"], stdin=str(test["input"]), files={"main.py": source},
                                      limits=limits)
        except SandboxFault as fault:  # after the sandbox's retries; whatever else was found is moot
            results.append({"index": i, "status": "sandbox_error", "wall_s": None})
            return Verdict(False, "sandbox_error", f"The sandbox failed to run {label} {i}: {fault}", results)
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


def output_cap(test: dict[str, Any]) -> int:
    """Bytes of stdout (and of stderr) a run may write: twice the expected output plus 64 KiB, and
    never less than the sandbox's default 1 MiB. A correct answer always fits; a flood still ends."""
    expected = test.get("output")
    if expected is None:
        return Limits.output_bytes
    size = len(str(expected).encode()) if "call" not in test else len(json.dumps(expected, default=repr))
    return max(Limits.output_bytes, 2 * size + (64 << 10))


#: Printed before a called function's return value, so that what the program itself prints is kept apart.
RESULT_MARKER = "\n<leafe-call-result>"


def call_harness(test: dict[str, Any]) -> str:
    """Code that calls the function of a call-based test (APPS) and prints its return value as JSON
    (tuples become lists, as APPS compares them); the judge compares it with the expected value."""
    return (f"import json as _json, sys as _sys\n_got = {_call_text(test)}\n"
            f"_sys.stdout.write({RESULT_MARKER!r} + _json.dumps(_got, default=repr))\n")


def _call_text(test: dict[str, Any]) -> str:
    return f"{test['call']}({', '.join(map(repr, test['args']))})"


def call_result(stdout: str) -> tuple[bool, Any]:
    """(found, value) of what `call_harness` printed."""
    if RESULT_MARKER not in stdout:
        return False, None
    text = stdout.rsplit(RESULT_MARKER, 1)[1]
    try:
        return True, json.loads(text)
    except json.JSONDecodeError:
        return True, text


def call_matches(got: Any, expected: Any) -> bool:
    """APPS's rule for call-based problems: the expected value, or the one element of the list that
    wraps it (APPS stores outputs as `[value]`)."""
    if got == expected:
        return True
    return isinstance(expected, list) and len(expected) == 1 and got == expected[0]


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
    if "call" in test:
        found, got = call_result(outcome.stdout)
        if not found:  # it exited (sys.exit(0), os._exit) before returning
            return "runtime_error"
        return "accepted" if call_matches(got, test["output"]) else "wrong_answer"
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
        if "code" in test:
            shown = f"\nTest:\n{_quote(test['code'])}"
        elif "call" in test:
            shown = f"\nCall:\n{_quote(_call_text(test))}"
        else:
            shown = f"\nInput:\n{_quote(test['input'])}"
        error = _tail(outcome.stderr)
        if "call" in test and outcome.returncode == 0:
            error = f"the program exited before {test['call']} returned"
        return f"{head} on {where}.{shown}\nError:\n{error}"
    if "call" in test:
        got = call_result(outcome.stdout)[1]
        return (f"Wrong answer on {where}.\nCall:\n{_quote(_call_text(test))}\nExpected:\n"
                f"{_quote(json.dumps(_unwrap(test['output'])))}\nGot:\n{_quote(json.dumps(got, default=repr))}")
    return (f"Wrong answer on {where}.\nInput:\n{_quote(test['input'])}\nExpected:\n{_quote(test['output'])}\n"
            f"Got:\n{_quote(outcome.stdout) or '(no output)'}")


def _unwrap(expected: Any) -> Any:
    return expected[0] if isinstance(expected, list) and len(expected) == 1 else expected


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


# -- the env -------------------------------------------------------------------------------------
_SUBMIT = ("Submit {what} in a ```python code block; you see the judge's verdict on the {shown} and may submit "
           "again ({{submissions}} submissions in all).\n\n")
INSTRUCTIONS = {
    "stdio": "Write a complete Python 3 program that solves the problem below. It reads the input from stdin "
             "and writes the answer to stdout. " + _SUBMIT.format(what="the whole program", shown="public tests"),
    "function": "Complete the Python function below. "
                + _SUBMIT.format(what="the whole function (with any imports it needs)", shown="examples"),
    "mbpp": "Write a Python function for the task below; the test shown calls it. "
            + _SUBMIT.format(what="the function (with any imports it needs)", shown="shown test"),
    "call": "Solve the problem below in Python 3 by completing the starter code: the judge calls the function "
            "with each test's arguments and compares its return value with the expected one. "
            + _SUBMIT.format(what="the whole code", shown="examples"),
}


def problem_format(problem: dict[str, Any]) -> str:
    """The problem's `format`; a JSONL of our own format may leave it out (told by its tests)."""
    if problem.get("format") in INSTRUCTIONS:
        return problem["format"]
    tests = problem["private_tests"] or problem["public_tests"]
    return "function" if tests and "code" in tests[0] else "call" if tests and "call" in tests[0] else "stdio"


def describe_example(i: int, test: dict[str, Any]) -> str:
    if "call" in test:
        return f"Example {i}:\nCall:\n{_quote(_call_text(test))}\nReturns:\n{_quote(json.dumps(_unwrap(test['output'])))}"
    return f"Example {i}:\nInput:\n{_quote(test['input'])}\nOutput:\n{_quote(test['output'])}"


@register
class CodeEnv(Env):
    """Program synthesis with execution feedback; rollback by snapshot (the state is a counter)."""

    name = "code"
    supports_snapshot = True
    data_choices = ("dataset", NAMES)

    def __init__(self, dataset: str = "leafe", max_submissions: int = 4, time_limit_s: float = 2.0,
                 memory_mb: int = 512, unsafe_no_sandbox: bool = False, data_dir: str | None = None):
        """`dataset`: leafe, humaneval, mbpp, apps, codecontests or a .jsonl/.parquet file of problems
        (see `leafe.envs.code.datasets`). `max_submissions`: 4, the paper's setting. `time_limit_s`: CPU seconds
        per test. `memory_mb`: address space per run. `unsafe_no_sandbox`: run without bubblewrap.
        `data_dir`: where a downloaded set lies (else $MBPP_DATA, $APPS_DATA, $CODECONTESTS_DATA)."""
        if max_submissions < 1:
            raise EnvError(f"max_submissions must be >= 1 (got {max_submissions})")
        self.data_status(dataset=dataset, data_dir=data_dir).require()
        self.dataset, self.data_dir, self.max_submissions = str(dataset), data_dir, int(max_submissions)
        self.time_limit_s, self.memory_mb = float(time_limit_s), int(memory_mb)
        self.unsafe = unsafe_no_sandbox
        self._problems: list[dict[str, Any]] | None = None
        self._problem: dict[str, Any] | None = None
        self._submissions = 0
        self._done = False

    @classmethod
    def data_status(cls, dataset: str = "leafe", data_dir: str | None = None, **_: object) -> DataStatus:
        return dataset_status(str(dataset), data_dir)

    @property
    def problems(self) -> list[dict[str, Any]]:
        if self._problems is None:
            self._problems = load_problems(self.dataset, self.data_dir)
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
        kind = problem_format(task.spec)
        self.instruction = INSTRUCTIONS[kind].format(submissions=self.max_submissions) + task.spec["statement"].strip("\n")
        examples = task.spec["public_tests"]
        if kind in ("function", "mbpp") or not examples:
            return f"{len(examples)} visible test{'s' if len(examples) != 1 else ''}. No submission yet."
        shown = "\n".join(describe_example(i, t) for i, t in enumerate(examples, 1))
        return f"{shown}\nNo submission yet."

    def step(self, action: str) -> StepResult:
        self.check_running(started=self._problem is not None, ended=self._done, what="problem")
        public, private = self._problem["public_tests"], self._problem["private_tests"]
        verdict = self._judge(action, public, "public test") if public else None
        hidden = self._judge(action, private, "hidden test") if verdict is None or (verdict.passed and private) else None
        # Counted once judged: a step the sandbox failed (EnvFault) leaves the env as it was.
        self._submissions += 1
        left = self.max_submissions - self._submissions
        info: dict[str, Any] = {"submission": self._submissions}
        success = False
        if verdict is not None and verdict.passed and hidden is None:
            success, text, info["status"] = True, "Accepted: all public tests passed.", "accepted"
        elif hidden is not None:
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

    def _judge(self, program: str, tests: list[dict[str, Any]], label: str) -> Verdict:
        """The judge's verdict on `tests`; `EnvFault` when the sandbox failed to run the program, a
        failure of the machine that must never reach the agent as feedback or the trainer as reward."""
        verdict = judge(program, tests, self.time_limit_s, self.memory_mb, sandbox=default_sandbox(self.unsafe),
                        label=label)
        if verdict.status == "sandbox_error":
            raise EnvFault(verdict.feedback, hint=SANDBOX_HINT)
        return verdict

    def snapshot(self) -> tuple:
        return (self._problem, self._submissions, self._done)

    def restore(self, snapshot: tuple) -> None:
        self._problem, self._submissions, self._done = snapshot
