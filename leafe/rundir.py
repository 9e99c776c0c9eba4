"""Resume by fingerprint: the one rule for work on disk, for every method and every study stage.

A method writes into its own directory and records there the fingerprint of the settings it runs
with (`leafe.fingerprint`). A rerun with the same fingerprint resumes (evaluation by task,
exploration by tree, GRPO from its last checkpoint, ACE by round); one with another fingerprint is
refused with the keys that differ, since mixing the two would make results of neither.

A study stage (`leafe.study.stages`) records `stage.json`: its digest (its fingerprint plus those of
the stages it reads), whether it finished, and its result. A finished stage with the same digest is
skipped; a stage whose digest changed is cleared and redone (`stage_status`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from leafe.errors import LeafeError
from leafe.files import read_json, write_json


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def check_resume(recorded: dict[str, Any] | None, fingerprint: dict[str, Any], where: Path, what: str) -> None:
    """Refuse to resume `what` in `where` when it was made with other settings."""
    if recorded is not None and recorded != fingerprint:
        raise LeafeError(f"{where} holds {what} with different settings ({', '.join(changed_keys(recorded, fingerprint))}); "
                         f"use another --out directory or delete it to start over")


def claim(header: Path, fingerprint: dict[str, Any], what: str, *, write: bool = True) -> None:
    """The settings file of a method's directory: written on the first run, checked on every rerun."""
    if header.exists():
        check_resume(read_json(header), fingerprint, header.parent, what)
    elif write:
        write_json(header, fingerprint)


# -- study stages ------------------------------------------------------------------------------

def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_status(directory: Path, stage_digest: str) -> str:
    """done | partial (started with these settings) | stale (other settings) | todo"""
    path = directory / "stage.json"
    if not path.exists():
        return "todo"
    record = read_json(path)
    if record.get("digest") != stage_digest:
        return "stale"
    return "done" if record.get("done") else "partial"
