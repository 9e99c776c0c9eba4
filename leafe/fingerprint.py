"""What a settings dataclass contributes to a fingerprint: the record that decides whether work on disk
(a study stage, a partial exploration, a cached base agent) was made with these settings.

A stage whose recorded fingerprint differs is cleared and redone, so a fingerprint must change only
when results would: it holds every field of the settings but those a class declares `speed_only`
(fields that change speed or memory, never results: a batch size). A knob added to a settings class
enters every fingerprint at once, so work recorded before it no longer matches: bump the run format
with it (`leafe.rundir.RUN_FORMAT`), so those run directories are redone or refused in one line that
says why.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from leafe.rundir import RUN_FORMAT


def fingerprint_fields(settings: Any) -> dict[str, Any]:
    """`asdict(settings)` without its speed-only fields."""
    speed_only = getattr(settings, "speed_only", ())
    return {k: v for k, v in asdict(settings).items() if k not in speed_only}


def resume_fingerprint(settings: Any, model: str) -> dict[str, Any]:
    """What must match for a method to resume the work in its directory: the fingerprint fields
    without those a rerun may change (`resume_free`: GRPO's step count, ACE's passes), plus the model
    it started from and the run format it is written in (`leafe.rundir.check_resume`)."""
    data = fingerprint_fields(settings)
    for key in getattr(settings, "resume_free", ()):
        data.pop(key, None)
    return data | {"model": model, "format": RUN_FORMAT}
