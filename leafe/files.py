"""Crash-safe files: atomic JSON writes and append-only JSONL that survives a kill mid-write."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from leafe.errors import CorruptFile

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
    """Write `data` atomically: readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, records: list[Any]) -> None:
    """Replace a JSONL file atomically (to cut records off its end; appends use `append_jsonl`)."""
    write_text(path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise CorruptFile(f"{path} is not valid JSON ({exc}); the file is corrupt") from exc


def append_jsonl(path: str | Path, record: Any) -> None:
    """Append one record as a line, flushed and fsynced before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, separators=(",", ":")) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> Iterator[Any]:
    """Records of a JSONL file. A torn last line (the writer was killed) is cut off the file and
    skipped, so the next append starts on a clean line; a bad line elsewhere is an error."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as f:
        data = f.read()
    good = data.rfind(b"\n") + 1
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    for number, line in enumerate(data[:good].splitlines(), start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorruptFile(f"{path}:{number} is not valid JSON ({exc}); the file is corrupt") from exc
