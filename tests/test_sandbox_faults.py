"""A failure of the sandbox or the machine is never the program's verdict, never a reward.

The failures are made for real: a `bwrap` that cannot make its namespaces (a stand-in that prints
bubblewrap's own message and exits 1, as bwrap does beside a benchmark that took the namespaces), a
sandbox user out of processes, a scratch directory on a full disk (/dev/full), an interpreter gone.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from helpers import ScriptedBackend

from leafe.envs import make
from leafe.envs.base import EnvFault
from leafe.envs.code import CodeEnv, judge, load_problems
from leafe.envs.code import env as code_module
from leafe.envs.code import sandbox as sandbox_module
from leafe.envs.code.sandbox import Limits, Sandbox, SandboxFault
from leafe.method import Job
from leafe.methods.evaluate import evaluate
from leafe.methods.explore import explore
from leafe.rollout import EnvUnavailable
from leafe.settings import EvalSettings, ExploreSettings, GRPOSettings
from leafe.trees import read_trees

STDIO = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6\n"}]
ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
NAMESPACE_FAILED = "bwrap: Creating new namespace failed: Resource temporarily unavailable"
PROBLEMS = {p["id"]: p for p in load_problems("leafe")}


class FlakyBwrap:
    """A `bwrap` that fails call by call as `plan` says ('F': prints bubblewrap's message for a
    namespace it could not make and exits 1, as bwrap does; '.': runs the real bwrap), then as `then`
    says. It lives where the sandbox user (`nobody` under a root judge) can run it and count calls."""

    def __init__(self, real: str, plan: str = "", then: str = "."):
        self.dir = Path(tempfile.mkdtemp(prefix="leafe-flaky-bwrap-"))
        self.dir.chmod(0o777)
        self.calls_file = self.dir / "calls"
        self.calls_file.touch(mode=0o666)
        self.calls_file.chmod(0o666)
        self.path = self.dir / "bwrap"  # the name the sandbox reaps orphans by
        self.path.write_text(textwrap.dedent(f"""\
            #!/bin/sh
            printf . >> {self.calls_file}
            step=$(printf '%s' '{plan}' | cut -c "$(wc -c < {self.calls_file})")
            [ -n "$step" ] || step='{then}'
            if [ "$step" = F ]; then
                echo '{NAMESPACE_FAILED}' >&2
                exit 1
            fi
            exec {real} "$@"
        """))
        self.path.chmod(0o755)

    @property
    def calls(self) -> int:
        return self.calls_file.stat().st_size


@pytest.fixture(scope="module")
def real_box() -> Sandbox:
    return Sandbox()


def copy(box: Sandbox, **changes) -> Sandbox:
    """A checked sandbox with some of its settings changed (the probe ran on the original)."""
    other = Sandbox.__new__(Sandbox)
    other.__dict__.update(box.__dict__, **changes)
    return other


@pytest.fixture
def flaky(real_box, monkeypatch):
    """flaky(plan, then) -> (a sandbox whose bwrap fails as planned, its FlakyBwrap); the code env's
    default sandbox becomes that one too. Retries pause for nothing unless a test says otherwise."""
    made = []

    def make_flaky(plan: str = "", then: str = ".", delays: tuple[float, ...] = (0.0, 0.0)):
        fake = FlakyBwrap(real_box.bwrap, plan, then)
        made.append(fake)
        box = copy(real_box, bwrap=str(fake.path), retry_delays_s=delays)
        monkeypatch.setitem(code_module._SANDBOXES, False, box)
        return box, fake

    yield make_flaky
    for fake in made:
        shutil.rmtree(fake.dir, ignore_errors=True)


# -- the judge -----------------------------------------------------------------------------------
def test_a_namespace_bwrap_could_not_make_is_tried_again_after_a_pause_and_the_answer_accepted(flaky):
    box, fake = flaky("F", delays=(0.5, 1.0))
    started = time.perf_counter()
    verdict = judge(ADD, STDIO, sandbox=box)
    assert verdict.status == "accepted", verdict.feedback
    assert fake.calls == 3  # test 1 failed once and ran on the second try; test 2 ran at once
    assert time.perf_counter() - started >= 0.5


def test_a_sandbox_that_keeps_failing_is_a_sandbox_error_never_the_programs(flaky):
    box, fake = flaky(then="F")
    verdict = judge(ADD, STDIO, sandbox=box, stop_at_first_failure=False)
    assert verdict.status == "sandbox_error" and not verdict.passed
    assert NAMESPACE_FAILED in verdict.feedback and "3 tries" in verdict.feedback
    assert verdict.tests == [{"index": 1, "status": "sandbox_error", "wall_s": None}]  # nothing more is judged
    assert fake.calls == 3


def test_a_program_that_says_what_bwrap_says_and_exits_1_is_still_the_programs_runtime_error(real_box):
    # The program's exit status and stderr are its own to choose: only the status pipe, which bwrap
    # writes once it has exec'd the program and the program never holds, makes a sandbox failure.
    mimic = f"import sys\nprint({NAMESPACE_FAILED!r}, file=sys.stderr)\nsys.exit(1)\n"
    verdict = judge(mimic, STDIO, sandbox=real_box)
    assert verdict.status == "runtime_error" and NAMESPACE_FAILED in verdict.feedback
    assert judge("import sys\nsys.exit(1)\n", STDIO, sandbox=real_box).status == "runtime_error"


def test_a_sandbox_user_out_of_processes_is_a_sandbox_fault_and_a_program_out_of_them_is_not(real_box):
    # No process left for the sandbox itself: bwrap cannot fork its namespace (EAGAIN).
    box = copy(real_box, retry_delays_s=())
    with pytest.raises(SandboxFault, match="Resource temporarily unavailable.*before the program started"):
        box.run([box.interpreter, "-I", "-c", "print('ok')"], limits=Limits(processes=0))
    # The program's own fork failing is the program's business.
    forks = "import os\ntry:\n    while True:\n        os.fork() or os._exit(0)\nexcept OSError as e:\n    print(e.errno)\n"
    outcome = box.run([box.interpreter, "-I", "-c", forks], limits=Limits(processes=4))
    assert outcome.stdout.strip() == "11"  # EAGAIN


def test_a_launcher_that_cannot_start_and_an_interpreter_gone_are_sandbox_errors(real_box, monkeypatch):
    box = copy(real_box, retry_delays_s=(), interpreter="/nonexistent/python3")
    verdict = judge(ADD, STDIO, sandbox=box)
    assert verdict.status == "sandbox_error" and "execvp /nonexistent/python3" in verdict.feedback
    box.interpreter = real_box.interpreter
    monkeypatch.setattr(sys, "executable", "/nonexistent/launcher-python")  # the launcher's interpreter
    verdict = judge(ADD, STDIO, sandbox=box)
    assert verdict.status == "sandbox_error" and "cannot start the sandbox" in verdict.feedback


def test_a_full_disk_under_the_scratch_directory_is_a_sandbox_error(real_box, monkeypatch, tmp_path):
    if not Path("/dev/full").is_char_device():  # a link to a missing /dev/full would create a file there
        pytest.skip("no /dev/full here")

    class FullDisk:
        """The sandbox's `tempfile`: each scratch directory it makes has main.py on /dev/full (ENOSPC)."""

        @staticmethod
        def gettempdir() -> str:
            return str(tmp_path)

        @staticmethod
        def mkdtemp(prefix: str = "") -> str:
            scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp_path))
            (scratch / "main.py").symlink_to("/dev/full")
            return str(scratch)

    box = copy(real_box, retry_delays_s=(0.0,))
    monkeypatch.setattr(sandbox_module, "tempfile", FullDisk)
    verdict = judge(ADD, STDIO, sandbox=box)
    assert verdict.status == "sandbox_error" and "No space left on device" in verdict.feedback
    assert list(tmp_path.iterdir()) == []  # every scratch directory was removed


def test_unsafe_mode_tells_its_own_failures_apart_too(monkeypatch):
    with pytest.warns(UserWarning):
        unsafe = Sandbox(unsafe=True)
    unsafe.retry_delays_s = ()
    assert judge(ADD, STDIO, sandbox=unsafe).passed
    mimic = "import sys\nprint('the sandbox failed', file=sys.stderr)\nsys.exit(127)\n"
    assert judge(mimic, STDIO, sandbox=unsafe).status == "runtime_error"
    unsafe.interpreter = "/nonexistent/python3"
    verdict = judge(ADD, STDIO, sandbox=unsafe)
    assert verdict.status == "sandbox_error" and "launcher failed: FileNotFoundError" in verdict.feedback


# -- the env and the stages ----------------------------------------------------------------------
def test_a_step_the_sandbox_failed_raises_env_fault_and_leaves_the_env_as_it_was(flaky):
    flaky("FFF")
    env = make("code", max_submissions=2)
    task = env.make_tasks(1, 0)[0]
    env.reset(task)
    before = env.snapshot()
    with pytest.raises(EnvFault, match=NAMESPACE_FAILED) as fault:
        env.step(task.spec["solutions"][0])
    assert "bwrap --unshare-all true" in fault.value.hint
    assert env.snapshot() == before  # the submission was not counted
    step = env.step("print(0)\n")
    assert step.info["status"] == "wrong_answer" and step.observation.endswith("1 submission left.")


def solution_reply(text: str) -> str:
    """The reference solution of the leafe problem whose statement is in the prompt."""
    (problem,) = [p for p in PROBLEMS.values() if p["statement"][:60] in text]
    return f"Thought: here it is.\nAction:\n```python\n{problem['solutions'][0]}```"


def test_evaluation_runs_a_faulted_episode_again_and_scores_only_real_ones(flaky, tiny_tokenizer, tmp_path):
    flaky("FFF")  # the first episode's first run: every try fails
    backend = ScriptedBackend(tiny_tokenizer, lambda text, i: solution_reply(text))
    settings = EvalSettings(env="code", tasks=2, task_seed=0, samples=2, max_new_tokens=400)
    result = evaluate(Job("scripted", tmp_path, backend=backend), settings, save_episodes=True).data
    assert [(t["n"], t["c"]) for t in result["tasks"]] == [(2, 2), (2, 2)]  # not one failure
    assert result["pass_at_k"]["1"] == 1.0 and result["faulted_episodes"] == 1
    episodes = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert sorted(e["meta"].get("faulted_runs", 0) for e in episodes) == [0, 0, 0, 1]
    assert all(e["finish"] == "success" for e in episodes)


def test_a_sandbox_down_stops_the_stage_with_its_last_message_and_what_to_do(flaky, tiny_tokenizer, tmp_path,
                                                                             monkeypatch):
    flaky(then="F")
    monkeypatch.setattr("leafe.rollout.MAX_FAULTS_IN_A_ROW", 3)
    backend = ScriptedBackend(tiny_tokenizer, lambda text, i: solution_reply(text))
    settings = EvalSettings(env="code", tasks=1, task_seed=0, samples=2, max_new_tokens=400)
    with pytest.raises(EnvUnavailable) as stopped:
        evaluate(Job("scripted", tmp_path, backend=backend), settings)
    message = str(stopped.value)
    assert message.startswith("3 env steps in a row failed in the env itself") and "\n" not in message
    assert NAMESPACE_FAILED in message and "bwrap --unshare-all true" in message and "rerun" in message


def test_exploration_explores_a_faulted_task_again_and_counts_it(flaky, tiny_tokenizer, tmp_path):
    # A first submission that is wrong, then the reference; the sandbox fails the first attempt's first run.
    _, fake = flaky("FFF")

    def reply(text: str, i: int) -> str:
        return solution_reply(text) if "1 submission left." in text else "Action:\nprint(0)\n"

    backend = ScriptedBackend(tiny_tokenizer, reply)
    settings = ExploreSettings(env="code", env_params={"max_submissions": 2}, tasks=1, task_seed=0,
                               strategy="independent", budget=4, max_new_tokens=400, stop_on_success=True)
    summary = explore(Job("scripted", tmp_path, backend=backend), settings).data
    assert summary["faulted_episodes"] == 1 and summary["success_rate"] == 1.0 and summary["env_steps"] == 2
    (tree,) = read_trees(tmp_path / "trees.jsonl")
    assert tree["faulted_episodes"] == 1
    (node,) = tree["nodes"]
    assert [s.info["status"] for s in node.episode.steps] == ["wrong_answer", "accepted"]
    assert fake.calls > 3


class ScriptedCodeEnv(CodeEnv):
    """The code env submitting, whatever the model says, the reference on even instances and a wrong
    program on odd ones: a GRPO group whose rewards are known (1, 0, 1, 0), for a tiny random model."""

    made = itertools.count()

    def __init__(self, **params):
        super().__init__(**params)
        self.right = next(ScriptedCodeEnv.made) % 2 == 0

    def parse_action(self, reply: str) -> str:
        return self._problem["solutions"][0] if self.right else "print(0)\n"


def test_grpo_trains_on_real_verdicts_only_and_logs_the_faulted_episodes(flaky, tiny_model_dir, tmp_path):
    from leafe.methods.grpo import train_grpo

    flaky("FFF")  # the group's first episode: every try of its first run fails
    ScriptedCodeEnv.made = itertools.count()
    settings = GRPOSettings(env="code", env_params={"max_submissions": 1}, tasks=1, task_seed=0, steps=1,
                            tasks_per_step=1, group_size=4, max_new_tokens=4, save_every=0)
    summary = train_grpo(Job(str(tiny_model_dir), tmp_path, envs=lambda name, **p: ScriptedCodeEnv(**p),
                             device="cpu"), settings)
    (record,) = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # Scored as a failure, the faulted run would make the group's success 1/4 (or 1/5): it is 2/4.
    assert record["faulted_episodes"] == 1 and record["success"] == 0.5 and record["env_steps"] == 4
    assert record["groups"] == 1 and record["skipped_groups"] == 0 and record["agent_tokens"] > 0
    assert summary.data["faulted_episodes"] == 1


def test_leafe_judge_gives_no_verdict_when_the_sandbox_fails(flaky, tmp_path):
    from typer.testing import CliRunner

    from leafe.cli import tools  # noqa: F401  (registers `judge` on the app)
    from leafe.cli.app import app

    flaky("", then="F")
    (tmp_path / "p.json").write_text(json.dumps({"public_tests": STDIO}))
    (tmp_path / "add.py").write_text(ADD)
    run = CliRunner().invoke(app, ["judge", "--problem", str(tmp_path / "p.json"), "--solution", str(tmp_path / "add.py")])
    assert run.exit_code == 2 and run.stdout.strip() == ""  # no verdict printed, nothing to score
    (line,) = run.stderr.strip().splitlines()
    assert "the sandbox failed, so" in line and str(tmp_path / "add.py") in line and NAMESPACE_FAILED in line


def test_early_experience_plays_a_faulted_demonstration_and_outcome_again(flaky, tiny_tokenizer):
    from leafe.methods.early_experience import demonstrations, sample_alternatives
    from leafe.rollout import RolloutEngine
    from leafe.settings import EarlyExperienceSettings

    _, fake = flaky("FFF")  # the expert's first submission: every try fails
    engine = RolloutEngine(ScriptedBackend(tiny_tokenizer, lambda text, i: "Action:\nprint(0)\n"), max_new_tokens=16)
    tasks = make("code").make_tasks(1, 0)
    states, rows, missing = demonstrations(engine, "code", {}, tasks)
    assert (len(states), len(rows), missing) == (1, 1, 0) and engine.recorder.counters.faults == 1
    assert "accepted" in states[0].expert_outcome.lower() and fake.calls > 3
    # An alternative whose outcome the sandbox failed is judged again, never recorded as the program's.
    _, fake = flaky("FFF")
    settings = EarlyExperienceSettings(env="code", alternatives=1)
    alternatives, _ = sample_alternatives(engine, states, settings)
    (alt,) = alternatives
    assert "sandbox" not in alt.outcome.lower() and "wrong answer" in alt.outcome.lower()
    assert engine.recorder.counters.faults == 2
