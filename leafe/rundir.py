"""Resume by fingerprint: the one rule for work on disk, for every method and every study stage.

A method writes into its own directory and records there the fingerprint of the settings it runs
with (`leafe.fingerprint`). A rerun with the same fingerprint resumes (evaluation by task,
exploration by tree, GRPO from its last checkpoint, ACE by round); one with another fingerprint is
refused with the keys that differ, since mixing the two would make results of neither.

A study stage (`leafe.study.stages`) records `stage.json`: its digest (its fingerprint plus those of
the stages it reads), whether it finished, and its result. A finished stage with the same digest is
skipped; a stage whose digest changed is cleared and redone (`stage_status`).

Every such record also holds the run format it was written in (`RUN_FORMAT`, under `format`). Work of
another format is never resumed: a study stage of an older format is cleared and redone like a stage
whose settings changed, one of a newer format (a later leafe's) is refused, and a method's directory
of any other format is refused in one line naming the fix.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from leafe.errors import LeafeError
from leafe.files import read_json, write_json

#: The format of what leafe writes for a later run to resume or reuse: a study stage's stage.json, a
#: method's settings record (through `claim`, `check_resume` and `leafe.fingerprint.resume_fingerprint`)
#: and the cached base agent (its digest, hence its directory, and its bootstrap.json).
#: Bump it with a change that makes the files written before unreadable, or their fingerprints
#: incomparable with the new ones (a knob added to a fingerprint, a record laid out anew): run
#: directories of the old format are then redone (study stages) or refused (a method's --out), in one
#: line each, instead of being read by compatibility code. Runs written before formats existed have
#: no `format` and count as format 0.
#: 1: fingerprints hold every knob that changes results (none left out at the value older runs used),
#: a study's sampling stages record their engine and its training stages their processes, every
#: stage its method's `start`.
RUN_FORMAT = 1

#: A study stage written in another run format: cleared and redone (as `stale`), said in its own words.
OLD_FORMAT = "old format"


def recorded_format(record: dict[str, Any]) -> int:
    """The run format a record was written in: 0 for one from before formats existed."""
    found = record.get("format", 0)
    return found if isinstance(found, int) else 0


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def check_resume(recorded: dict[str, Any] | None, fingerprint: dict[str, Any], where: Path, what: str) -> None:
    """Refuse to resume `what` in `where` when it was written in another run format, or made with other
    settings. `fingerprint` holds this run's format (`leafe.fingerprint.resume_fingerprint` puts it there)."""
    if recorded is None:
        return
    found = recorded_format(recorded)
    if found != RUN_FORMAT:
        newer = "upgrade leafe, " if found > RUN_FORMAT else ""
        raise LeafeError(f"{where} holds {what} written by leafe run format {found}, and this leafe writes format "
                         f"{RUN_FORMAT}: {newer}use another --out directory or delete it to start over")
    if recorded != fingerprint:
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
    """done | partial (started with these settings) | stale (other settings) | `OLD_FORMAT` (written in
    an older run format) | todo. A stage written by a newer leafe (a later format) is refused: redoing
    it would throw away work this leafe cannot read."""
    path = directory / "stage.json"
    if not path.exists():
        return "todo"
    record = read_json(path)
    found = recorded_format(record)
    if found > RUN_FORMAT:
        raise LeafeError(f"{path} was written by leafe run format {found}, newer than this leafe's {RUN_FORMAT}: "
                         f"upgrade leafe, or use another --out directory")
    if found != RUN_FORMAT:
        return OLD_FORMAT
    if record.get("digest") != stage_digest:
        return "stale"
    return "done" if record.get("done") else "partial"


def stage_note(state: str, directory: Path) -> str:
    """What a study says of a stage as it begins: its `stage_status` in words (nothing for `todo`)."""
    if state == OLD_FORMAT:
        path = directory / "stage.json"
        found = recorded_format(read_json(path)) if path.exists() else 0
        return f"written by leafe run format {found}, this leafe writes {RUN_FORMAT}; redoing it"
    return {"done": "done earlier, skipped", "partial": "resuming", "stale": "config changed: redoing"}.get(state, "")
