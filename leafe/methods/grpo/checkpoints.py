"""GRPO's checkpoints: `out/checkpoints/step-N`, each a plain model directory with its model card;
the newest one also holds the training state that a rerun resumes from."""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from leafe.files import writing
from leafe.methods.grpo.trainer import GRPOTrainer
from leafe.modelcard import write_model_card

#: A checkpoint's training state: accelerate's `save_state` (fp32 weights, optimiser, random states;
#: sharded the way the run is), kept on the newest checkpoint only.
STATE = "state"


def resumable_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Checkpoints a run can resume from (those holding training state), oldest first."""
    found = []
    for path in (out / "checkpoints").glob("step-*"):
        if (path / STATE).is_dir() and path.name[5:].isdigit():
            found.append((int(path.name[5:]), path))
    return sorted(found)


def save_checkpoint(trainer: GRPOTrainer, out: Path, step: int, keep: int, card: dict[str, Any]) -> None:
    """The model of `step` (a plain directory a user can keep, with its model card: `card` holds the
    base model and the counts so far) and the training state to resume from, written under a
    temporary name and renamed when complete. Every rank calls it (gathering sharded weights and
    saving sharded state are collectives); rank 0 renames and prunes: older checkpoints lose their
    training state, and only the newest `keep` models stay.

    A save that fails (a full disk: `DiskFull`, one line naming the checkpoint) leaves the checkpoints
    as they were: the temporary one is deleted (its space freed; `resumable_checkpoints` never takes
    its name for one), the older ones are pruned only after the rename, so a rerun resumes from the
    last one."""
    final = out / "checkpoints" / f"step-{step}"
    tmp = out / "checkpoints" / f".step-{step}.tmp"
    if trainer.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.barrier()
    with writing(final, scratch=tmp if trainer.rank == 0 else None):
        trainer.save_model(tmp)
        if trainer.rank == 0:
            write_model_card(tmp, card["base_model"], "grpo", asdict(trainer.settings), card["data"])
        # accelerate warns that it drops the tied output head from the safetensors file, at every save; the
        # head is the embedding matrix itself, so loading the state (tested by the resume test) restores it.
        shared_warning = logging.getLogger("accelerate.utils.other")
        level = shared_warning.level
        shared_warning.setLevel(logging.ERROR)
        try:
            trainer.accelerator.save_state(str(tmp / STATE))
        finally:
            shared_warning.setLevel(level)
    trainer.barrier()
    if trainer.rank != 0:
        return
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for _, older in resumable_checkpoints(out)[:-1]:
        shutil.rmtree(older / STATE, ignore_errors=True)
    models = sorted((int(p.name[5:]), p) for p in (out / "checkpoints").glob("step-*") if p.name[5:].isdigit())
    for _, older in models[:-keep]:
        shutil.rmtree(older, ignore_errors=True)
