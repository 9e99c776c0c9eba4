"""The judge and its sandbox: every verdict kind, and attacks that must leave no trace behind."""

from __future__ import annotations

import os
import socket
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from leafe.envs.code import judge
from leafe.envs.code import sandbox as sandbox_module
from leafe.envs.code.sandbox import Limits, Sandbox, SandboxError

STDIO = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6\n"}]
ADD = "a, b = map(int, input().split())\nprint(a + b)\n"


@pytest.fixture(scope="module")
def box() -> Sandbox:
    return Sandbox()


def sandbox_uid() -> int:
    return sandbox_module.NOBODY if os.geteuid() == 0 else os.getuid()


def own_tree() -> set[int]:
    """This test process and its ancestors (they share the uid when not root)."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return pids


def processes_of(uid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    found.add(int(entry.name))
            except OSError:
                pass
    return found - own_tree()


def scratch_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("leafe-sandbox-*")}


def run_attack(box: Sandbox, source: str, time_s: float = 1.0, tests=None):
    """Judge `source` and check that it left no process and no scratch directory behind."""
    before, dirs = processes_of(sandbox_uid()), scratch_dirs()
    verdict = judge(textwrap.dedent(source), tests or [{"input": "", "output": "done"}], time_limit_s=time_s,
                    sandbox=box)
    time.sleep(0.2)  # the kernel reaps a killed namespace asynchronously
    assert processes_of(sandbox_uid()) - before == set(), "a process outlived the judge"
    assert scratch_dirs() == dirs, "a scratch directory was left behind"
    return verdict


# -- verdicts ------------------------------------------------------------------------------------
def test_accepted_and_output_compared_token_wise(box):
    assert judge(ADD, STDIO, sandbox=box).status == "accepted"
    spaced = "a, b = map(int, input().split())\nprint('  ', a + b, '\\n\\n')\n"
    assert judge(spaced, STDIO, sandbox=box).passed


def test_wrong_answer_quotes_input_expected_and_actual(box):
    verdict = judge("a, b = map(int, input().split())\nprint(a - b)\n", STDIO, sandbox=box)
    assert verdict.status == "wrong_answer" and not verdict.passed
    assert verdict.feedback == "Wrong answer on test 1.\nInput:\n2 3\nExpected:\n5\nGot:\n-1"
    assert [t["status"] for t in verdict.tests] == ["wrong_answer"]  # stops at the first failure


def test_runtime_error_shows_the_traceback_tail(box):
    verdict = judge("x = [1]\nprint(x[5])\n", STDIO, sandbox=box)
    assert verdict.status == "runtime_error"
    assert "IndexError: list index out of range" in verdict.feedback and "line 2" in verdict.feedback


def test_syntax_error_is_found_without_running(box):
    verdict = judge("def f(:\n    pass\n", STDIO, sandbox=box)
    assert verdict.status == "syntax_error" and "line 1" in verdict.feedback and verdict.tests == []


def test_function_tests_assertions_are_wrong_answers(box):
    tests = [{"code": "assert add(2, 3) == 5"}, {"code": "assert add(-1, 1) == 0, 'add(-1, 1) should be 0'"}]
    assert judge("def add(a, b):\n    return a + b\n", tests, sandbox=box).status == "accepted"
    verdict = judge("def add(a, b):\n    return a * b\n", tests, sandbox=box)
    assert verdict.status == "wrong_answer" and "assert add(2, 3) == 5" in verdict.feedback


def test_time_limit_for_cpu_and_for_sleeping(box):
    started = time.perf_counter()
    assert run_attack(box, "while True:\n    pass\n").status == "time_limit"
    assert run_attack(box, "import time\ntime.sleep(30)\n").status == "time_limit"
    assert time.perf_counter() - started < 2 * Limits(time_s=1.0).wall_s + 2


def test_memory_bomb_is_a_memory_limit(box):
    verdict = run_attack(box, "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n")
    assert verdict.status == "memory_limit", verdict.feedback


def test_flooding_stdout_or_stderr_is_an_output_limit(box):
    started = time.perf_counter()
    assert run_attack(box, "while True:\n    print('x' * 1000)\n").status == "output_limit"
    assert run_attack(box, "import sys\nwhile True:\n    sys.stderr.write('y' * 1000)\n").status == "output_limit"
    assert time.perf_counter() - started < 6


# -- attacks -------------------------------------------------------------------------------------
def test_a_correct_answer_larger_than_a_mebibyte_is_accepted_and_a_flood_still_ends(box):
    # 1.3 MB of expected output: the cap follows it (twice its size plus 64 KiB), not a fixed 1 MiB.
    big = [{"input": "130000\n", "output": "123456789\n" * 130000}]
    answer = "import sys\nsys.stdout.write('123456789\\n' * int(input()))\n"
    verdict = judge(answer, big, sandbox=box)
    assert verdict.status == "accepted", verdict.feedback
    flood = run_attack(box, "while True:\n    print('123456789')\n", tests=big)
    assert flood.status == "output_limit" and f"more than {2 * 1_300_000 + (64 << 10)} bytes" in flood.feedback


def test_fork_storm_is_contained_and_reaped(box):
    verdict = run_attack(box, """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    assert verdict.status in ("time_limit", "runtime_error")


def test_a_detached_daemon_dies_with_the_program(box):
    verdict = run_attack(box, """
        import os, subprocess, sys, time
        for _ in range(2):
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        if os.fork() == 0:  # and a classic double-fork daemon
            os.setsid()
            if os.fork() == 0:
                time.sleep(120)
            os._exit(0)
        print("done")
    """)
    assert verdict.status == "accepted"


def test_writes_outside_the_scratch_dir_leave_nothing(box, tmp_path):
    mark = uuid.uuid4().hex
    home = Path.home()
    verdict = run_attack(box, f"""
        import os
        results = []
        for path in ["/tmp/leafe-{mark}", os.path.expanduser("~/leafe-{mark}"), "{home}/leafe-{mark}",
                     "{tmp_path}/leafe-{mark}", "leafe-{mark}"]:
            try:
                with open(path, "w") as f:
                    f.write("x")
                results.append("wrote")
            except OSError:
                results.append("refused")
        print(" ".join(results))
    """)
    assert verdict.status == "wrong_answer"
    # /tmp and ~ (= the scratch dir) are private and writable; the real home and the test's dir are not.
    assert "Got:\nwrote wrote refused refused wrote" in verdict.feedback
    for place in (Path("/tmp"), home, tmp_path, Path(tempfile.gettempdir())):
        assert not (place / f"leafe-{mark}").exists()


def test_no_connection_reaches_a_listener_on_loopback(box):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        verdict = run_attack(box, f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=1).sendall(b"hi")
                print("connected")
            except OSError as e:
                print("refused", type(e).__name__)
        """, tests=[{"input": "", "output": "refused"}])
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert "connected" not in verdict.feedback


def test_killing_the_parent_does_not_harm_the_judge(box):
    judge_pid = os.getpid()
    verdict = run_attack(box, f"""
        import os, signal
        for pid in (os.getppid(), 1, {judge_pid}):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        print("done")
    """)
    assert verdict.status in ("accepted", "runtime_error", "wrong_answer")
    assert judge(ADD, STDIO, sandbox=box).passed  # the judge goes on


def test_the_environment_and_the_judges_secrets_stay_out(box, monkeypatch):
    secret = "s3cret-" + uuid.uuid4().hex
    monkeypatch.setenv("LEAFE_TEST_SECRET", secret)
    verdict = run_attack(box, f"""
        import os
        print(dict(os.environ))
        for pid in ({os.getpid()}, {os.getppid()}):
            try:
                print(open(f"/proc/{{pid}}/environ").read())
            except OSError as e:
                print("no", type(e).__name__)
    """)
    assert verdict.status == "wrong_answer" and "HOME" in verdict.feedback
    assert secret not in verdict.feedback and "LEAFE_TEST_SECRET" not in verdict.feedback


# -- set-up --------------------------------------------------------------------------------------
def test_missing_bwrap_is_refused_unless_unsafe_is_asked_for(monkeypatch):
    monkeypatch.setattr(sandbox_module, "find_bwrap", lambda: None)
    with pytest.raises(SandboxError, match="--unsafe-no-sandbox"):
        Sandbox()
    with pytest.warns(UserWarning, match="without the bubblewrap sandbox"):
        unsafe = Sandbox(unsafe=True)
    assert judge(ADD, STDIO, sandbox=unsafe).passed
    verdict = judge("while True:\n    pass\n", STDIO, time_limit_s=1.0, sandbox=unsafe)
    assert verdict.status == "time_limit"  # rlimits and the timeout still hold


def test_a_program_that_writes_before_reading_a_large_input_does_not_deadlock(box):
    big = "1 " * 400_000  # far more than a pipe buffer
    source = "import sys\nsys.stdout.write('x' * 200000)\nsys.stdout.write(str(len(sys.stdin.read().split())))\n"
    started = time.perf_counter()
    verdict = judge(source, [{"input": big, "output": "x" * 200000 + "400000"}], sandbox=box)
    assert verdict.status == "accepted" and time.perf_counter() - started < 3
