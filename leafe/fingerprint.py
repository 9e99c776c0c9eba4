"""What a settings dataclass contributes to a fingerprint: the record that decides whether work on disk
(a study stage, a partial exploration, a cached base agent) was made with these settings.

A stage whose recorded fingerprint differs is cleared and redone, so a fingerprint must change only
when results would. Two class-level declarations keep it that way:
- `speed_only`: fields that change speed or memory, never results (a batch size);
- `added_later`: knobs added after runs were recorded, each with the value that reproduces those
  runs; at that value the knob stays out of the fingerprint, so a run directory written before the
  knob existed is still done after an upgrade (without it, adding a knob redid every stage of every
  existing study from the first stage down).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any


def fingerprint_fields(settings: Any) -> dict[str, Any]:
    """`asdict(settings)` without its speed-only fields and its later knobs left at their old value."""
    speed_only = getattr(settings, "speed_only", ())
    added_later = getattr(settings, "added_later", {})
    return {k: v for k, v in asdict(settings).items()
            if k not in speed_only and not (k in added_later and added_later[k] == v)}


def resume_fingerprint(settings: Any, model: str) -> dict[str, Any]:
    """What must match for a method to resume the work in its directory: the fingerprint fields
    without those a rerun may change (`resume_free`: GRPO's step count, ACE's passes) and without
    knobs its own partial files predate (`resume_added_later`), plus the model it started from."""
    data = fingerprint_fields(settings)
    for key in getattr(settings, "resume_free", ()):
        data.pop(key, None)
    for key, old in getattr(settings, "resume_added_later", {}).items():
        if data.get(key) == old:
            data.pop(key)
    return data | {"model": model}
