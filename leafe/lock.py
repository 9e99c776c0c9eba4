"""One writer per run directory: the lock every command that writes an --out / run directory holds.

Two `leafe` processes writing one directory would interleave their appends and replace each other's
files, and neither would notice. `run_lock(directory)` makes the second one stop before it writes
anything, in one line that names the holder (pid, host, since when, its command) and the lock file to
delete if the user is sure the holder is gone. The lock is what makes resume safe to trust: a rerun
continues the files of a run that is over, never those of one still running.

The lock file sits beside the directory, `<parent>/.<name>.leafe-lock`, not in it: commands replace
or empty their output directory (bootstrap renames a finished build over it) and an empty --out must
stay empty for the checks that look at it. It is a small JSON record of the holder: pid, host, the
process's start time, when it took the lock, its command and a random token.

What it relies on:
- Taking it is `open(O_CREAT | O_EXCL)`, atomic on local filesystems and on NFSv3+ and Lustre: of
  processes racing for one directory exactly one creates the file. No fcntl/flock (Lustre and some
  NFS mounts do not carry them across machines). A holder writes its record right after creating
  the file; a reader that finds it empty waits a moment for it.
- A lock whose holder is gone is stale and the next writer takes it over, with a warning (after a
  kill -9 or a crashed machine this is how the rerun resumes). On the holder's own host that is
  exact: the pid is not alive, or is a zombie, or now belongs to a process with another start time
  (psutil, which accelerate depends on). Hosts are told apart by their hostname, so two containers that share a hostname and a
  filesystem but not a pid namespace are not told apart. On another host the pid cannot be checked:
  the holder touches the lock file every `HEARTBEAT_S` seconds (a thread), and a lock whose file is
  older than `STALE_AFTER_S` counts as stale there. That assumes the machines' clocks agree within
  minutes (NTP) and that a live holder is never stopped (SIGSTOP, a frozen VM) for that long.
- Taking over goes through a second file, `<lock>.break`, made the same exclusive way: the one
  process that holds it checks that the lock is still the stale one it judged, and only then
  deletes it; everyone then races for the lock with O_EXCL again, so exactly one wins.
- The directory's path is resolved (symlinks followed) before the lock file is named; two machines
  that mount a shared filesystem at different paths still name the same file, beside the directory.

Children of a locked run write in its directory too: `leafe run` launches training stages under
`accelerate launch`, and runs stages side by side in processes of their own. The holder puts
`LEAFE_RUN_LOCK=<lock file>:<token>` in its environment, which its children inherit; `run_lock` in a
child whose directory is the locked one or inside it, while that lock still holds the token, takes
nothing and goes on. Ranks other than 0 of a multi-process launch never take a lock (rank 0 is the
one writer; `leafe.files.is_main_process`), so `leafe launch` ranks and other machines' ranks of a
study are never refused.

A child must not outlive the run that started it: the rerun after a killed `leafe run` takes the
lock over as stale, and a stage process or launcher still writing would then be a second writer.
So those children ask the kernel to end them when their parent dies, however it dies
(`die_with_parent`, Linux's PR_SET_PDEATHSIG); a plain SIGTERM to `leafe run` (what `kill` and
schedulers send) then ends its stages too.

A directory inside one that a live run holds is refused too (a `leafe eval --out runs/x/base` beside
`leafe run` on runs/x); the reverse, a run over a directory in which another command writes a
subdirectory, is not checked.

The lock is released when the holder ends, by return, exception or Ctrl-C (a command takes it with
`leafe.cli.app.hold_out`; `LeafeGroup` releases it when the command ends). A kill -9 or SIGTERM
leaves it behind, stale: the next run takes it over.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from leafe.errors import LeafeError
from leafe.files import is_main_process

#: The environment variable that carries a holder's lock to its child processes: "<lock file>:<token>".
LOCK_ENV = "LEAFE_RUN_LOCK"
#: How often a holder touches its lock file, and how old the file of another host's holder must be to
#: count as stale (its heartbeat stopped).
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
#: A `.break` file older than this was left by a process that died while taking over a stale lock.
_BREAK_STALE_S = 30.0
#: How long a reader waits for the record of a lock file just created (empty until its holder writes it).
_RECORD_WAIT_S = 2.0

log = logging.getLogger(__name__)


class RunLocked(LeafeError):
    """Another live process holds the run directory."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: the record in the lock file."""

    directory: str
    pid: int
    host: str
    started: float  # the process's start time (psutil create_time): a reused pid has another one
    since: float  # when it took the lock
    command: str
    token: str

    def describe(self) -> str:
        command = f"`{self.command}` " if self.command else ""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"{command}(pid {self.pid} on {self.host}, since {when})"


#: A lock file without a readable record: its holder died between creating and writing it.
_NOBODY = Holder(directory="", pid=0, host="", started=0.0, since=0.0, command="", token="")


def die_with_parent(parent_pid: int | None = None) -> None:
    """Have the kernel send this process SIGTERM when its parent dies (see the module's text). Given
    `parent_pid`, a parent that died before this call is caught too. Linux only; elsewhere nothing."""
    if (prctl := _prctl()) is None:
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def dying_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for a child process that must end with this one. libc is looked up here, in the
    parent: between fork and exec the child only makes the one call (no import, no lock to take)."""
    if (prctl := _prctl()) is None:
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def lock_path(directory: str | Path) -> Path:
    """The lock file of `directory`: beside it, named after it."""
    directory = Path(directory).resolve()
    if directory == directory.parent:  # the root has no parent to sit in
        return directory / ".leafe-lock"
    return directory.parent / f".{directory.name}.leafe-lock"


@contextlib.contextmanager
def run_lock(directory: str | Path, command: str = "") -> Iterator[None]:
    """Hold `directory` for this process while the block runs (see the module docstring): refused
    with `RunLocked` while another live process holds it or a directory above it; a stale lock is
    taken over with a warning; nothing is taken by ranks other than 0, or by a child of the run that
    holds it (`LEAFE_RUN_LOCK`)."""
    directory = Path(directory).resolve()
    if not is_main_process() or _inherited(directory):
        yield
        return
    _refuse_held_above(directory)
    held = _acquire(directory, command)
    try:
        yield
    finally:
        held.release()


def _inherited(directory: Path) -> bool:
    """Whether this process is a child of the run that holds `directory` or a directory above it."""
    path, _, token = os.environ.get(LOCK_ENV, "").rpartition(":")
    if not path or not token:
        return False
    holder = _read(Path(path))
    if holder is None or holder.token != token:  # released, or taken over since: the parent is gone
        return False
    locked = Path(holder.directory)
    return directory == locked or locked in directory.parents


def _refuse_held_above(directory: Path) -> None:
    for above in directory.parents:
        if above == above.parent:
            break
        path = lock_path(above)
        holder = _read(path) if path.exists() else None
        if holder is not None and stale_reason(holder, path) is None:
            raise RunLocked(f"{directory} is inside {above}, which {holder.describe()} is writing; wait for it to "
                            f"end, or if you are sure it is gone delete {path}")


def stale_reason(holder: Holder, path: Path) -> str | None:
    """Why `holder`'s lock (at `path`) no longer holds, or None while it does."""
    if holder is _NOBODY:
        return "the lock file names no holder"
    if holder.host == socket.gethostname():
        import psutil

        try:
            process = psutil.Process(holder.pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return f"process {holder.pid} has exited"
            if abs(process.create_time() - holder.started) > 1.0:
                return f"pid {holder.pid} now belongs to another process"
        except psutil.NoSuchProcess:
            return f"process {holder.pid} is gone"
        except psutil.AccessDenied:  # someone else's process: alive, and nothing more can be told
            pass
        return None
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "the lock file is gone"
    if age > STALE_AFTER_S:
        return f"its heartbeat on {holder.host} stopped {age / 60:.0f} minutes ago"
    return None


def _read(path: Path) -> Holder | None:
    """The holder recorded in `path`; None when there is no lock file; `_NOBODY` when it stays empty
    or unreadable past `_RECORD_WAIT_S` (its holder died before writing its record)."""
    deadline = time.monotonic() + _RECORD_WAIT_S
    while True:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data)
            return Holder(**{name: record[name] for name in Holder.__dataclass_fields__})  # more keys: a later leafe's
        except (ValueError, TypeError, KeyError):
            if time.monotonic() > deadline:
                return _NOBODY
            time.sleep(0.02)


def _create(path: Path, record: bytes) -> bool:
    """Create `path` holding `record` if no such file exists: the atomic step every taker races on."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, record)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


def _break(path: Path, stale: Holder, record: bytes) -> bool:
    """Delete the lock at `path` if it is still `stale`; True when this process deleted it. Only the
    holder of `<lock>.break` may delete, so two processes that judged one lock stale cannot delete a
    fresh lock that a third took in between."""
    breaker = path.with_name(path.name + ".break")
    if not _create(breaker, record):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - breaker.stat().st_mtime > _BREAK_STALE_S:
                breaker.unlink()
        time.sleep(0.01)
        return False
    try:
        current = _read(path)
        if current is None or current.token != stale.token:
            return False
        path.unlink()
        return True
    finally:
        breaker.unlink(missing_ok=True)


class _Held:
    """A lock this process took: the heartbeat that keeps it fresh, and its release."""

    def __init__(self, path: Path, holder: Holder):
        self.path, self.holder = path, holder
        self.env_before = os.environ.get(LOCK_ENV)
        os.environ[LOCK_ENV] = f"{path}:{holder.token}"  # children of this run inherit it
        self.stop = threading.Event()
        self.beat = threading.Thread(target=self._heartbeat, name="leafe-lock-heartbeat", daemon=True)
        self.beat.start()

    def _heartbeat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # deleted by hand, or the filesystem is away: nothing to keep fresh
                return

    def release(self) -> None:
        self.stop.set()
        if self.env_before is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = self.env_before
        current = _read(self.path)
        if current is not None and current.token == self.holder.token:  # never another's lock
            self.path.unlink(missing_ok=True)


def _acquire(directory: Path, command: str, timeout_s: float = 30.0) -> _Held:
    import psutil

    path = lock_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = Holder(directory=str(directory), pid=os.getpid(), host=socket.gethostname(),
                started=psutil.Process().create_time(), since=time.time(), command=command, token=uuid.uuid4().hex)
    record = json.dumps(asdict(me)).encode()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # each turn: someone else took it, released it or broke it
        if _create(path, record):
            return _Held(path, me)
        holder = _read(path)
        if holder is None:  # released between our create and our read
            continue
        why = stale_reason(holder, path)
        if why is None:
            raise RunLocked(f"{directory} is being written by {holder.describe()}; wait for it to end, or if you "
                            f"are sure it is gone delete {path}")
        if _break(path, holder, record):  # then race for it like everyone else
            log.warning("warning: removed the stale lock %s of %s: %s", path, holder.describe(), why)
    raise LeafeError(f"could not take the lock {path} within {timeout_s:.0f}s (others kept taking it); retry")
