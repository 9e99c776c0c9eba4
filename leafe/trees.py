"""Exploration trees, the file LEAFE's stage 1 writes and stage 2, the report and `leafe show-tree` read.

`trees.jsonl` holds one record per task: its id, success, counts, and `nodes`, the episodes of its tree
(a root, or a branch re-sampled from step tau of its parent with an experience in context).
Reading a tree needs only this module, never the search that wrote it (`leafe.methods.explore`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leafe.episode import Episode
from leafe.errors import CorruptFile
from leafe.files import read_jsonl


@dataclass
class Node:
    """One episode of a task's tree: a root, or a branch re-sampled from step `tau` of `parent`."""

    id: int
    parent: int | None = None
    depth: int = 0
    tau: int | None = None
    #: len of h_tau's ids: the branch's token_ids[:prefix_len] are the parent's, without the experience.
    prefix_len: int | None = None
    experience: str | None = None
    #: The reflection reply that asked for this branch.
    reflection: str | None = None
    #: Experiences put in context at the start (refine).
    context_experiences: list[str] = field(default_factory=list)
    episode: Episode | None = None
    #: success | failed | rolled_back (a reflection branched off it) | budget | stopped (the task
    #: succeeded elsewhere) | context (no room for another turn)
    outcome: str = ""
    reflections: list[dict[str, Any]] = field(default_factory=list)
    env_steps: int = 0
    replayed_steps: int = 0
    generated_tokens: int = 0
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["episode"] = self.episode.to_dict() if self.episode is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Node:
        data = dict(data)
        data["episode"] = Episode.from_dict(data["episode"]) if data.get("episode") else None
        return cls(**data)


def read_trees(path: str | Path) -> list[dict[str, Any]]:
    """The tree records of a trees.jsonl, nodes as `Node`s."""
    records = []
    for number, record in enumerate(read_jsonl(path), start=1):
        try:
            record["nodes"] = [Node.from_dict(n) for n in record["nodes"]]
            record["task_id"], record["success"]  # noqa: B018 (what every reader of a tree needs)
        except (KeyError, TypeError, AttributeError) as exc:
            raise CorruptFile(f"{path}:{number} is not a tree written by leafe explore (bad or missing "
                              f"{exc}); pass the trees.jsonl of an exploration") from None
        records.append(record)
    return records
