"""Crash-safe files: atomic JSON writes and append-only JSONL that survive a kill mid-write and a full
disk (one `DiskFull` line naming the file; nothing half-written kept, so the rerun resumes)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from leafe.errors import CorruptFile, DiskFull

# mkstemp makes files 0600; written files get the mode open() would give them (0666 less the umask).
_UMASK = os.umask(0)
os.umask(_UMASK)


def process_rank() -> tuple[int, int]:
    """(rank, number of processes) under a multi-process launch (`accelerate launch` sets RANK and
    WORLD_SIZE); (0, 1) in one process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of a multi-process launch, or the only process: the one that writes shared outputs and
    prints reports."""
    return process_rank()[0] == 0


def cache_dir(kind: str) -> Path:
    """Where built artefacts of one kind live (`models`, `textworld` games): $LEAFE_CACHE/<kind>,
    by default ./.leafe/<kind>."""
    return Path(os.environ.get("LEAFE_CACHE", Path.cwd() / ".leafe")) / kind


def write_text(path: str | Path, text: str) -> None:
    """Readers see the old file or the new one, never a half-written one."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` atomically: readers see the old file or the new one, never a half-written one
    (on a full disk too: `DiskFull`, and the old file stays)."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)  # a network filesystem may report the full disk only here
            finally:
                os.close(fd)
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


#: A full disk and a full quota: writes that fail with them succeed once space is freed.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
#: Free space under which a library's write error that names no cause counts as a full disk.
_LOW_SPACE = 16 << 20


def disk_full_error(exc: BaseException, path: object = None, where: str | Path | None = None) -> DiskFull | None:
    """`DiskFull` naming `path` when `exc` is a full disk, else None.

    A full disk is an OSError with ENOSPC or EDQUOT (Python's own writes; anywhere in the chain of
    causes), or a library's error that gives the system's words for it (safetensors: "No space left
    on device (os error 28)"). torch.save says only "file write failed" or "unexpected pos": with
    `where` (the file or directory being written, before its partial files are deleted), an OSError or
    RuntimeError while its filesystem has under 16 MiB left counts too."""
    seen, cause = set(), exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        code = cause.errno if isinstance(cause, OSError) else None
        text = str(cause)
        if code in DISK_FULL or any(os.strerror(c) in text for c in DISK_FULL):
            return DiskFull(path, quota=code == errno.EDQUOT or os.strerror(errno.EDQUOT) in text)
        cause = cause.__cause__ or cause.__context__
    if where is not None and isinstance(exc, (OSError, RuntimeError)) and _free_bytes(Path(where)) < _LOW_SPACE:
        return DiskFull(path)
    return None


def _free_bytes(path: Path) -> float:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return float("inf")


@contextlib.contextmanager
def writing(path: str | Path, scratch: str | Path | None = None) -> Iterator[None]:
    """The block writes `path`. If it fails, `scratch` (a temporary file or directory of the write) is
    deleted, so nothing half-written stays, and a full disk is raised as `DiskFull` naming `path`:
    one line, not a library's traceback. The writes above, GRPO's checkpoints and the SFT model
    save go through here."""
    try:
        yield
    except Exception as exc:
        full = None if isinstance(exc, DiskFull) else disk_full_error(exc, path, where=scratch or path)
        if scratch is not None:
            _remove(Path(scratch))
        if full is not None:
            raise full from exc
        raise
    except BaseException:  # Ctrl-C: still nothing half-written left behind
        if scratch is not None:
            _remove(Path(scratch))
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, records: list[Any]) -> None:
    """Replace a JSONL file atomically (to cut records off its end; appends use `append_jsonl`)."""
    write_text(path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))


#: Where a model is written inside its directory before `publish_model_dir` moves it in.
MODEL_STAGING = ".model.partial"


def publish_model_dir(out: str | Path) -> None:
    """Move the model directory written in OUT/MODEL_STAGING into `out`, which never looks like a whole
    model while it is not one: its config.json (what every loader reads first) goes first and the new
    one comes last. The old model's weight files the new one lacks go too (a stale shard index would
    point a loader at old shards), and so does its model card (README.md describes the old model: the
    method writes the new one's once it is published); the rest of `out` (a method's records, a
    stage.json) stays."""
    out = Path(out)
    staging = out / MODEL_STAGING
    (out / "config.json").unlink(missing_ok=True)
    new = {p.name for p in staging.iterdir()}
    for old in out.iterdir():
        weights = old.name.startswith(("model", "pytorch_model")) and old.name.endswith((".safetensors", ".bin", ".index.json"))
        if old.is_file() and (weights or old.name == "README.md") and old.name not in new:
            old.unlink()
    for path in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
        if path.is_dir():
            shutil.rmtree(out / path.name, ignore_errors=True)
        os.replace(path, out / path.name)
    staging.rmdir()


def read_text(path: str | Path) -> str:
    """The text of a file leafe reads: UTF-8, else one `CorruptFile` line naming the file (a binary
    file or another encoding is the wrong file given, not a bug)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFile(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                          f"is it the right file?") from None


def read_json(path: str | Path, kind: type | tuple[type, ...] = dict) -> Any:
    """The JSON value of a file, which must be a `kind`: each JSON file leafe reads holds one object,
    so that is the default (`object` takes any value)."""
    text = read_text(path)
    if not text.strip():
        raise CorruptFile(f"{path} is empty; the file is truncated or was never written")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptFile(f"{path} is not valid JSON ({exc}); the file is truncated or corrupt") from None
    return expect(value, kind, path)


#: JSON's names for the Python types `json` reads it into.
_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "true or false", type(None): "null"}


def expect(value: Any, kind: type | tuple[type, ...], where: str | Path, keys: tuple[str, ...] = ()) -> Any:
    """`value` when it is a `kind` (a dict: holding every one of `keys`), else one `CorruptFile` line
    naming `where` (a file, or `file:line`) and what it holds instead. The shape check of every
    reader of a file whose records the code then indexes, so a wrong file is never a KeyError."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if object not in kinds and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
        wanted = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
        raise CorruptFile(f"{where} holds {_JSON_NAMES.get(type(value), type(value).__name__)} where {wanted} "
                          f"belongs; is it the right file?")
    missing = [k for k in keys if k not in value]
    if missing:
        raise CorruptFile(f"{where} lacks {', '.join(map(repr, missing))}; is it the right file?")
    return value


def append_jsonl(path: str | Path, record: Any) -> None:
    """Append one record as a line, fsynced before returning. An append that fails (a full disk:
    `DiskFull`) cuts the file back to where it was: a torn line must not stay, since the next append
    would glue a whole line onto it and the two would be read as one bad record."""
    path = Path(path)
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            end = os.fstat(fd).st_size
            try:
                _write_all(fd, line)
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)


def read_jsonl(path: str | Path, kind: type | tuple[type, ...] = dict) -> Iterator[Any]:
    """Records of a JSONL file, each a `kind` (leafe writes objects). A torn last line (the writer was
    killed) is cut off the file and skipped, so the next append starts on a clean line; a bad line
    elsewhere is an error. The file is cut only after every complete line has read well, and only when
    the torn line is text: a file that is not JSONL (a binary given by mistake) is never written to."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1
    records = list(json_lines(data[:good], path, kind))
    if good < len(data):
        tail = data[good:]
        try:
            tail.decode("utf-8")
        except UnicodeDecodeError:
            number = data.count(b"\n") + 1
            raise CorruptFile(f"{path}:{number} is not UTF-8 text; is it the right file?") from None
        with open(path, "r+b") as f:
            f.truncate(good)
    yield from records


def json_lines(data: bytes, path: str | Path, kind: type | tuple[type, ...] = dict) -> Iterator[Any]:
    """The records of JSONL `data` read from `path`, each a `kind`; a line that is not UTF-8, not JSON
    or not a `kind` is one `CorruptFile` line naming `path:line`. Blank lines are skipped."""
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise CorruptFile(f"{path}:{number} is not UTF-8 text; is it the right file?") from None
        except json.JSONDecodeError as exc:
            raise CorruptFile(f"{path}:{number} is not valid JSON ({exc}); the file is corrupt") from None
        yield expect(record, kind, f"{path}:{number}")
