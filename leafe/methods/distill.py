"""LEAFE stage 2: distil the corrections found by exploration into the weights, by SFT.

Two data sets, cut from the exact token ids that exploration recorded (nothing is re-encoded):
- D_cf, one row per branch (a branching event sampled twice gives two rows): the context is h_tau as the policy saw it before any
  reflection, i.e. the branch's ids with every experience message taken out (its own and any
  inherited from ancestor branches); the target is the corrected action a'_tau as it was sampled.
  Without e, the model must infer the fix from the environment's feedback alone, which is what it
  will have at test time. By default only events whose branch went on to succeed (the branch or a
  branch below it solved the task) count; `cf_from="all"` takes every event. The paper leaves this
  open (one example per branching event, about 3 a task); docs/usage.md has what each choice yields.
- D_reh, rehearsal: a sampled fraction of successful episodes (successful branches included, their
  experience messages taken out the same way); each agent turn t becomes a row (h_t -> a_t).

Loss: L = L_cf + beta * L_reh, as per-row weights (1 for D_cf rows, beta for D_reh rows) in the
weighted token NLL of `sft.py`; only the target action's tokens carry loss.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from leafe.backends.base import loading_model
from leafe.errors import LeafeError
from leafe.files import is_main_process, write_json
from leafe.method import Job, MethodResult, cost
from leafe.methods.sft import Row, span_row, train
from leafe.modelcard import write_model_card
from leafe.settings import DistillSettings, SFTSettings
from leafe.trees import Node, read_trees


class NoDistillationRows(LeafeError):
    """Stage 1 left nothing to distil (no branch led to a success, no successful episode)."""

    def __init__(self, trees: int, counts: dict[str, int]):
        self.trees, self.counts = trees, counts
        super().__init__(f"no distillation rows in {trees} trees ({counts['branches']} branches, "
                         f"{counts['successful_episodes']} successful episodes); explore more tasks or use --cf-from all")


def experience_spans(node: Node, nodes: Sequence[Node]) -> list[tuple[int, int]]:
    """[start, end) of every experience message in `node.episode.token_ids`, in order.

    A branch's own experience sits between h_tau (prefix_len) and the context of its step tau; an
    ancestor's experience is inherited when it lies inside the shared prefix.
    """
    if node.parent is None:
        if node.context_experiences:
            raise LeafeError("episodes that start with experiences in context (refine) cannot be cleaned; "
                             "distil trees explored with --strategy leafe")
        return []
    parent = nodes[node.parent]
    spans = [s for s in experience_spans(parent, nodes) if s[1] <= node.prefix_len]
    spans.append((node.prefix_len, node.episode.steps[node.tau].context_len))
    return spans


def clean_episode(node: Node, nodes: Sequence[Node]) -> tuple[list[int], list[tuple[int, int]]]:
    """The episode's ids without experience messages, and each step's action span in them."""
    ids = node.episode.token_ids
    spans = experience_spans(node, nodes)
    keep, cursor = [], 0
    for start, end in spans:
        keep.append((cursor, start))
        cursor = end
    keep.append((cursor, len(ids)))

    def shift(position: int) -> int:
        return position - sum(end - start for start, end in spans if end <= position)

    cleaned = [t for start, end in keep for t in ids[start:end]]
    actions = [(shift(s.action_start), shift(s.action_end)) for s in node.episode.steps]
    return cleaned, actions


def _went_on_to_succeed(node: Node, children: dict[int, list[Node]]) -> bool:
    return node.outcome == "success" or any(_went_on_to_succeed(c, children) for c in children.get(node.id, []))


def build_rows(trees: Sequence[dict[str, Any]], settings: DistillSettings) -> tuple[list[Row], dict[str, int]]:
    """D_cf and D_reh rows from tree records (as `read_trees` returns them), and counts."""
    settings.validate()
    rows: list[Row] = []
    counts = {"branches": 0, "cf_branches_used": 0, "successful_episodes": 0, "reh_episodes": 0}
    successful: list[tuple[Node, list[Node]]] = []
    for tree in trees:
        nodes: list[Node] = tree["nodes"]
        children: dict[int, list[Node]] = {}
        for node in nodes:
            if node.parent is not None:
                children.setdefault(node.parent, []).append(node)
        for node in nodes:
            if node.episode is None or len(node.episode.steps) <= (node.tau or 0):
                continue
            if node.parent is not None:
                counts["branches"] += 1
                if settings.use_cf and (settings.cf_from == "all" or _went_on_to_succeed(node, children)):
                    counts["cf_branches_used"] += 1
                    ids, actions = clean_episode(node, nodes)
                    rows.append(span_row(ids, actions[node.tau], 1.0, "cf"))
            if node.outcome == "success" and not node.context_experiences:
                successful.append((node, nodes))
    # Exactly reh_fraction of the successful episodes (at least one when the fraction is not 0): a
    # coin per episode leaves D_reh empty by chance on small runs (seed 0 draws 25 coins above 0.2).
    counts["successful_episodes"] = len(successful)
    wanted = max(1, round(settings.reh_fraction * len(successful))) if settings.reh_fraction and successful else 0
    for i in sorted(random.Random(settings.seed).sample(range(len(successful)), wanted)):
        node, nodes = successful[i]
        ids, actions = clean_episode(node, nodes)
        rows.extend(span_row(ids, span, settings.beta, "reh") for span in actions)
    counts["reh_episodes"] = wanted
    return rows, counts


def distill(job: Job, settings: DistillSettings, sft: SFTSettings) -> MethodResult:
    """Build D_cf and D_reh from the trees in `job.inputs`, fine-tune `job.model` on them into
    `job.out` (a model directory); the result's data is `distill.json` (row counts, training stats).
    Raises `NoDistillationRows` when stage 1 left nothing to distil."""
    from transformers import AutoConfig, AutoTokenizer

    settings.validate()
    trees = []
    model, out_dir, tree_files = job.model, job.out, job.inputs
    for path in tree_files:
        if not Path(path).exists():
            raise LeafeError(f"{path} does not exist; pass the trees.jsonl files that leafe explore wrote")
        trees.extend(read_trees(path))
    rows, counts = build_rows(trees, settings)
    if settings.beta == 0:  # L = L_cf only: rehearsal rows would carry no loss, so leave them out
        rows = [r for r in rows if r.kind != "reh"]
    with loading_model(model):
        config = AutoConfig.from_pretrained(model)
    limit = getattr(config, "max_position_embeddings", None) or 1 << 30
    kept = [r for r in rows if len(r.input_ids) <= limit]
    dropped = {kind: sum(1 for r in rows if r.kind == kind and len(r.input_ids) > limit) for kind in ("cf", "reh")}
    if not kept:
        raise NoDistillationRows(len(trees), counts)
    with loading_model(model):
        tokenizer = AutoTokenizer.from_pretrained(model)
    started = time.perf_counter()

    def on_log(entry: dict) -> None:
        job.progress.start(entry["max_steps"], entry["step"])
        job.progress.advance(0, status=f"loss {entry['loss']:.3f}")

    stats = train(model, tokenizer, kept, out_dir, sft, on_log=on_log, precision=job.precision, tracker=job.tracker)
    stats.pop("model")
    sets = {}
    for kind in ("cf", "reh"):
        of_kind = [r for r in kept if r.kind == kind]
        sets[kind] = {"rows": len(of_kind), "tokens": sum(len(r.input_ids) for r in of_kind),
                      "loss_tokens": sum(r.loss_tokens for r in of_kind), "dropped_over_context": dropped[kind]}
    summary = {
        "model": str(model),
        "trees": [str(p) for p in tree_files],
        "tasks": len(trees),
        "sets": sets,
        "counts": counts,
        "settings": asdict(settings),
        "training": {**asdict(sft), **{k: v for k, v in stats.items() if k != "log"}},
        "loss_log": stats["log"],
        "wall_s": round(time.perf_counter() - started, 2),
    }
    if is_main_process():  # one writer under a multi-process launch
        write_model_card(out_dir, str(model), "distill", {"distill": asdict(settings), "sft": asdict(sft)},
                         {"tasks": len(trees), "sets": sets, "branching": counts, "steps": stats["steps"]})
        write_json(Path(out_dir) / "distill.json", summary)
    return MethodResult("distill", str(out_dir), {"distill": asdict(settings), "sft": asdict(sft)}, summary,
                        {**cost(wall_s=summary["wall_s"]), "ran": stats["ran"]})
