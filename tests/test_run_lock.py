"""One writer per run directory (`leafe.lock`): a second writer is refused in one line naming the
holder; a lock whose holder is gone is taken over with a warning; the holder's own children and
ranks other than 0 go on; of processes racing for one lock exactly one wins."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import leafe_command

from leafe.lock import LOCK_ENV, STALE_AFTER_S, RunLocked, lock_path, run_lock


def _eval(model, out) -> list[str]:
    return leafe_command("eval", "--model", model, "--out", out, "--tasks", 2, "--samples", 2, "--max-new-tokens", 6,
                "--task-seed", 500, "--env-param", "max_steps=4")


def _env(**changes) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (LOCK_ENV, "RANK", "WORLD_SIZE")}
    return {**env, **{k: v for k, v in changes.items() if v is not None}}


def _record(path: Path) -> dict | None:
    """The holder's record, once its holder has written it."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _stderr_lines(run) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.strip()]


def test_a_second_leafe_on_the_same_out_is_refused_and_a_killed_holder_is_taken_over(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    first = subprocess.Popen(_eval(tiny_model_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True, env=_env())
    lock = lock_path(out)
    try:
        deadline = time.time() + 60
        while (held := _record(lock)) is None and first.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert held is not None, first.stderr.read().decode()[-2000:] if first.poll() is not None else "no lock"
        os.killpg(first.pid, signal.SIGSTOP)  # it holds the lock for as long as this test needs
        assert held["pid"] == first.pid and held["command"] == "leafe eval"

        second = subprocess.run(_eval(tiny_model_dir, out), capture_output=True, text=True, timeout=120, env=_env())
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        (line,) = _stderr_lines(second)
        assert line.startswith(f"error: {out.resolve()} is being written by `leafe eval` (pid {first.pid} on "
                               f"{socket.gethostname()}, since "), line
        assert line.endswith(f"wait for it to end, or if you are sure it is gone delete {lock}")
        assert not (out / "eval.json").exists()
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # kill -9: the lock stays behind, stale
        first.wait()
    assert _record(lock)["pid"] == first.pid

    rerun = subprocess.run(_eval(tiny_model_dir, out), capture_output=True, text=True, timeout=300, env=_env())
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"warning: removed the stale lock {lock} of `leafe eval` (pid {first.pid} on " in rerun.stderr
    assert f"process {first.pid} is gone" in rerun.stderr
    assert json.loads((out / "eval.json").read_text())["samples"] == 2
    assert not lock.exists()  # released on exit


def test_the_lock_goes_when_the_command_fails(tmp_path):
    out = tmp_path / "run"
    failed = subprocess.run(leafe_command("report", out), capture_output=True, text=True, timeout=120, env=_env())
    assert failed.returncode == 2 and "has no results.json" in failed.stderr  # failed after it took the lock ...
    assert not lock_path(out).exists()  # ... and gave it back
    with pytest.raises(ValueError), run_lock(out):
        assert lock_path(out).exists()
        raise ValueError("a bug")
    assert not lock_path(out).exists()


def test_children_and_other_ranks_of_the_holder_go_on_and_strangers_are_refused(tmp_path):
    run = tmp_path / "run"
    stage = run / "grpo" / "train"
    # A real leafe command that takes its directory's lock and then fails for want of results.json:
    # reaching that error means the lock let it through.
    child = leafe_command("report", stage)
    with run_lock(run, "leafe run"):
        assert os.environ[LOCK_ENV] == f"{lock_path(run)}:{json.loads(lock_path(run).read_text())['token']}"
        inherited = subprocess.run(child, capture_output=True, text=True, timeout=120,
                                   env=_env(**{LOCK_ENV: os.environ[LOCK_ENV]}))
        rank1 = subprocess.run(child, capture_output=True, text=True, timeout=120, env=_env(RANK="1", WORLD_SIZE="2"))
        stranger = subprocess.run(child, capture_output=True, text=True, timeout=120, env=_env())
    for went_on in (inherited, rank1):
        assert went_on.returncode == 2 and "has no results.json" in went_on.stderr, went_on.stderr
    assert stranger.returncode == 2
    (line,) = _stderr_lines(stranger)
    assert line.startswith(f"error: {stage.resolve()} is inside {run.resolve()}, which `leafe run` (pid {os.getpid()} ")
    assert LOCK_ENV not in os.environ and not lock_path(run).exists()


def _stale_record(path: Path, **fields) -> None:
    record = {"directory": str(path), "pid": os.getpid(), "host": socket.gethostname(), "started": 0.0,
              "since": time.time() - 3600, "command": "leafe run", "token": "old", **fields}
    record.pop("empty", None)
    lock_path(path).parent.mkdir(parents=True, exist_ok=True)
    lock_path(path).write_text(json.dumps(record))


@pytest.mark.parametrize("fields, why", [
    ({"pid": 2 ** 22 + 7}, "process 4194311 is gone"),  # above the kernel's pid_max: no such process
    ({}, f"pid {os.getpid()} now belongs to another process"),  # this pid, but started at another time
    ({"host": "elsewhere", "age": STALE_AFTER_S + 60}, "its heartbeat on elsewhere stopped 11 minutes ago"),
    ({"empty": True}, "the lock file names no holder"),  # its holder died between creating and writing it
], ids=["dead-pid", "reused-pid", "other-host-silent", "no-record"])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog, monkeypatch, fields, why):
    out = tmp_path / "out"
    age = fields.pop("age", 0)
    _stale_record(out, **fields)
    if fields.get("empty"):
        lock_path(out).write_text("")
        monkeypatch.setattr("leafe.lock._RECORD_WAIT_S", 0.1)  # how long a reader waits for a record
    os.utime(lock_path(out), (time.time() - age, time.time() - age))
    with caplog.at_level(logging.WARNING, logger="leafe.lock"), run_lock(out, "leafe eval"):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert why in caplog.text and "removed the stale lock" in caplog.text
    assert not lock_path(out).exists()


def test_another_hosts_lock_with_a_fresh_heartbeat_is_refused_naming_the_host(tmp_path):
    out = tmp_path / "out"
    _stale_record(out, host="node-17", pid=4242)
    with pytest.raises(RunLocked, match=r"`leafe run` \(pid 4242 on node-17, since .*delete .*\.out\.leafe-lock"):
        with run_lock(out):
            pass
    assert json.loads(lock_path(out).read_text())["host"] == "node-17"  # theirs: left alone


RACER = textwrap.dedent("""
    import os, sys, time
    from leafe.lock import RunLocked, run_lock
    out, start, release = sys.argv[1:]
    time.sleep(max(0.0, float(start) - time.time()))
    try:
        with run_lock(out, "racer"):
            print("won", flush=True)
            deadline = time.time() + 60
            while not os.path.exists(release) and time.time() < deadline:  # hold it while the others try
                time.sleep(0.02)
    except RunLocked:
        print("refused")
""")


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_of_processes_racing_for_one_lock_exactly_one_wins(tmp_path, stale):
    out, release = tmp_path / "out", tmp_path / "release"
    if stale:  # every racer judges it stale; only one may delete it, and no one the winner's lock
        _stale_record(out)
    start = time.time() + 1.5  # all of them started and waiting, then all at once
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(out), str(start), str(release)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
              for _ in range(6)]
    deadline = time.time() + 60
    while sum(r.poll() is not None for r in racers) < 5 and time.time() < deadline:
        time.sleep(0.02)
    release.touch()
    outcomes = [r.communicate(timeout=60) for r in racers]
    said = sorted(stdout.strip() for stdout, _ in outcomes)
    assert said == ["refused"] * 5 + ["won"], outcomes
    removed = [err for _, err in outcomes if "removed the stale lock" in err]
    assert len(removed) == (1 if stale else 0), outcomes
    assert not lock_path(out).exists() and not Path(f"{lock_path(out)}.break").exists()
