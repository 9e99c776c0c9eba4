"""Supervised training on pre-tokenized rows, through TRL's SFTTrainer. One SFT path for leafe.

A row is exact token ids with labels (-100 where no loss: prompts, observations, experiences) and a
weight. The loss is the weighted token NLL, sum_rows w_r * sum_t nll_rt / (number of loss tokens),
so a set of rows with weight beta contributes beta times its share: L = L_cf + beta * L_reh when the
counterfactual rows have weight 1 and the rehearsal rows weight beta. SFTTrainer's own loss has no
per-row weight, so `compute_loss` is ours; batching, optimisation, schedules, checkpointing and
(optional) LoRA are TRL/transformers/peft.

A killed training resumes: every `save_every` steps the Trainer writes a checkpoint (weights,
optimiser, schedule, random states) under OUT/trainer, marked whole once every rank has written its
share, and a rerun on the same rows with the same settings goes on from the newest whole one, to the
same weights as a run never stopped (the data order and random states are the checkpoint's). The
final model reaches OUT through `publish_model_dir`, so OUT never looks like a finished model while
it is not one; the checkpoints go once it is there.

Used by bootstrap (pretraining the embedded agent), distillation and the Early Experience baseline.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import struct
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leafe.backends.base import loading_model
from leafe.errors import LeafeError
from leafe.files import MODEL_STAGING, is_main_process, process_rank, publish_model_dir, read_json, write_json, writing
from leafe.fingerprint import fingerprint_fields
from leafe.methods.distributed import (
    lora_scaling,
    make_accelerator,
    merge_lora,
    mixed_precision,
    ran,
    without_tied_head,
)
from leafe.methods.token_logprobs import logits_only_at, scored_positions, token_logprobs
from leafe.modelcard import save_model
from leafe.rundir import RUN_FORMAT, check_resume
from leafe.settings import SFTSettings
from leafe.tracking import Tracker


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]  # -100 where the token carries no loss
    weight: float = 1.0
    kind: str = ""  # which data set the row came from (for accounting only)
    #: Per-position factors on top of `weight` (aligned with input_ids), or None for 1 everywhere:
    #: bootstrap puts the decision token of each move ahead of the format tokens around it.
    token_weights: list[float] | None = None

    @property
    def loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != -100)


def row_from_mask(input_ids: Sequence[int], mask: Sequence[int], weight: float = 1.0, kind: str = "") -> Row:
    """A row whose loss covers exactly the tokens where `mask` is 1."""
    if len(input_ids) != len(mask):
        raise ValueError(f"ids and mask differ in length ({len(input_ids)} vs {len(mask)})")
    labels = [t if m else -100 for t, m in zip(input_ids, mask)]
    return Row(list(input_ids), labels, weight, kind)


def span_row(ids: Sequence[int], span: tuple[int, int], weight: float = 1.0, kind: str = "") -> Row:
    """A row that ends at `span`'s end with loss on the span only (one target turn after its context)."""
    start, end = span
    return Row(list(ids[:end]), [-100] * start + list(ids[start:end]), weight, kind)


def make_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None, seed: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (little padding), in a seeded random order.

    A batch holds at most `batch_size` rows and, when `max_tokens` is set, at most `max_tokens`
    padded tokens (a row longer than that is a batch on its own).
    """
    import random

    rng = random.Random(seed)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending length: the row being added is the longest so far
        if current and (len(current) >= batch_size or (max_tokens and (len(current) + 1) * lengths[i] > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


class _Collator:
    """Pads the rows of one prepared batch (the Trainer sees each batch as a single example)."""

    def __init__(self, rows: Sequence[Row], pad_id: int):
        self.rows, self.pad_id = rows, pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [self.rows[i] for e in examples for i in e["members"]]
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            ids[i, :n] = torch.tensor(r.input_ids)
            labels[i, :n] = torch.tensor(r.labels)
            mask[i, :n] = 1
        weights = torch.ones((len(rows), width))
        for i, r in enumerate(rows):
            weights[i] *= float(r.weight)
            if r.token_weights is not None:
                weights[i, :len(r.token_weights)] *= torch.tensor(r.token_weights, dtype=torch.float)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights}


def weighted_nll(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, normalizer: float) -> torch.Tensor:
    """sum over rows and loss tokens of weight * NLL(next token), divided by `normalizer`, from the
    logits of the whole batch (B, L, vocab): the definition `target_nll` computes without them.

    `weights` is one per row (B,) or one per position (B, L), aligned with `labels`."""
    scored = labels[:, 1:] != -100
    return target_nll(logits[:, :-1][scored], labels, weights, normalizer)


def target_nll(selected: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, normalizer: float) -> torch.Tensor:
    """`weighted_nll` from the logits of the scored positions only (N, vocab), in the row-major order
    of `labels[:, 1:] != -100` (what `logits_only_at` returns); the fp32 softmax goes by chunks."""
    scored = labels[:, 1:] != -100
    per_token = weights[:, 1:] if weights.dim() == 2 else weights[:, None].expand(scored.shape)
    logp, _ = token_logprobs(selected, labels[:, 1:][scored])
    return -(logp * per_token[scored].to(logp.dtype)).sum() / max(float(normalizer), 1.0)


def _checkpointing_field() -> str:
    """transformers 5.2x calls it activation_checkpointing; the 5.1x that vLLM pins, gradient_checkpointing."""
    import dataclasses

    from trl import SFTConfig

    return "activation_checkpointing" if "activation_checkpointing" in {
        f.name for f in dataclasses.fields(SFTConfig)} else "gradient_checkpointing"


def _trainer_class():
    from trl import SFTTrainer

    class WeightedSFTTrainer(SFTTrainer):
        """SFTTrainer with per-row loss weights (see the module docstring)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weights = inputs.pop("weights")
            labels = inputs.pop("labels")
            # The head sees only the positions that score a target (the turns trained on), never the
            # whole batch's full-vocabulary logits (leafe.methods.token_logprobs).
            with logits_only_at(model, scored_positions(labels != -100)):
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                use_cache=False)
            tokens = (labels[:, 1:] != -100).sum()
            normalizer = num_items_in_batch if num_items_in_batch is not None else tokens
            loss = target_nll(outputs.logits, labels, weights, float(normalizer))
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            mode = "train" if model.training else "eval"
            with torch.no_grad():
                hit = (outputs.logits.argmax(-1) == labels[:, 1:][labels[:, 1:] != -100]).sum()
                self._metrics[mode]["mean_token_accuracy"].append((hit / tokens.clamp(min=1)).item())
            return (loss, outputs) if return_outputs else loss

    return WeightedSFTTrainer


def _progress_callback(on_log: Callable[[dict], None]):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and state.is_world_process_zero:  # one progress report per launch
                on_log(_log_entry({**logs, "step": state.global_step}, state.max_steps))

    return Progress()


def _logged(on_log: Callable[[dict], None] | None, tracker: Tracker | None) -> Callable[[dict], None]:
    """One loss-log entry to the caller's progress and to the run's trackers (the figures at its step)."""

    def log(entry: dict) -> None:
        if tracker is not None:
            tracker.log({k: v for k, v in entry.items() if k != "max_steps"}, step=entry["step"])
        if on_log is not None:
            on_log(entry)

    return log


def _log_entry(logged: dict, max_steps: int) -> dict:
    """One loss-log record, from what the Trainer logged at a step (an entry of its log_history)."""
    return {"step": logged["step"], "max_steps": max_steps, **{k: v for k, v in logged.items() if k != "step"}}


# -- resuming a killed training -----------------------------------------------------------------

#: Inside a training's output directory: transformers' output_dir, where the checkpoints go.
CHECKPOINTS = "trainer"
#: In CHECKPOINTS: what its checkpoints were made from (`resume_key`); only the same training resumes them.
RESUME_KEY = "resume_key.json"
#: In a checkpoint, written once every rank has saved its share: a checkpoint without it is partial.
WHOLE = "whole.json"


def resume_key(model: Any, rows: Sequence[Row], settings: SFTSettings, precision: str, processes: int) -> dict[str, Any]:
    """What checkpoints must have been made from to be resumed: the rows (a digest of their ids,
    labels and weights), the settings that change results, the starting model, precision and ranks,
    and the run format (`leafe.rundir.check_resume`)."""
    digest = hashlib.sha256()
    for r in rows:
        digest.update(struct.pack("<qqd", len(r.input_ids), len(r.token_weights or ()), r.weight))
        digest.update(array("q", r.input_ids).tobytes() + array("q", r.labels).tobytes())
        digest.update(array("d", r.token_weights or ()).tobytes())
    if isinstance(model, (str, Path)):
        start = str(model)
    else:  # built in memory (bootstrap): its architecture; its initial weights are its builder's seed's
        start = f"{type(model).__name__} {hashlib.sha256(model.config.to_json_string().encode()).hexdigest()[:16]}"
    return {**fingerprint_fields(settings), "model": start, "rows": f"{len(rows)}, sha256 {digest.hexdigest()[:16]}",
            "precision": precision, "processes": processes, "format": RUN_FORMAT}


def whole_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in `directory` a rerun can resume from, oldest first."""
    found = []
    for path in directory.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and (path / WHOLE).exists():
            found.append((int(step), path))
    return sorted(found)


def resume_point(directory: Path, key: dict[str, Any], record: bool = True) -> Path | None:
    """The newest whole checkpoint in `directory`, or None to start at step 0. Checkpoints made from
    other rows or settings are refused (resuming them would mix two trainings); rank 0 clears partial
    ones (a run killed while saving) and, with `record`, records `key` for the next rerun."""
    recorded = read_json(directory / RESUME_KEY) if (directory / RESUME_KEY).exists() else None
    whole = whole_checkpoints(directory)
    if whole:
        check_resume(recorded, key, directory, "the checkpoints of another training")
    if is_main_process():
        for path in directory.glob("checkpoint-*"):
            if not (path / WHOLE).exists():
                shutil.rmtree(path, ignore_errors=True)
        if record:
            write_json(directory / RESUME_KEY, key)
    return whole[-1][1] if whole else None


def _checkpoint_callback(directory: Path):
    """Marks each checkpoint whole once every rank has saved its share and then drops the older ones
    (the Trainer's own rotation could drop the last whole one while the newest is still partial).
    None at the last step: the final model is written right after it."""
    from accelerate import PartialState
    from transformers import TrainerCallback

    class Checkpoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False

        def on_save(self, args, state, control, **kwargs):
            PartialState().wait_for_everyone()
            if state.is_world_process_zero:
                write_json(directory / f"checkpoint-{state.global_step}" / WHOLE, {"step": state.global_step})
                for _, older in whole_checkpoints(directory)[:-1]:
                    shutil.rmtree(older, ignore_errors=True)

    return Checkpoints()


def _save_steps(settings: SFTSettings) -> int:
    """`save_every` rounded up to a multiple of `logging_steps`: a run resumed from a checkpoint then
    logs the same mean losses as one never stopped (each logged mean covers the steps since the last)."""
    return math.ceil(settings.save_every / settings.logging_steps) * settings.logging_steps


def _run_loss(history: list[dict], session_loss: float, steps: int, resumed_at: int) -> float:
    """The mean loss over all `steps` of a training resumed at step `resumed_at`: the Trainer's own
    mean covers its session only, so the steps before it come from the logged means (one log falls
    on every checkpoint: `_save_steps`). Equal to an unbroken run's up to rounding (~1e-16 relative)."""
    if not resumed_at:
        return session_loss
    total, last = 0.0, 0
    for logged in history:
        if "loss" in logged and logged["step"] <= resumed_at:
            total += logged["loss"] * (logged["step"] - last)
            last = logged["step"]
    return (total + session_loss * (steps - resumed_at)) / steps


def _publish(out: Path, model: Any, state: dict[str, torch.Tensor], tokenizer: Any) -> None:
    """Write the trained model into `out` (`publish_model_dir`), then drop the checkpoints it ends."""
    staging = out / MODEL_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    with writing(out, scratch=staging):  # a full disk: DiskFull naming OUT; the half-written staging goes
        save_model(staging, model, tokenizer, state)
    publish_model_dir(out)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


def bf16_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with its floating tensors in bf16; tensors shared in `state` (tied embeddings) stay shared."""
    cast: dict[int, torch.Tensor] = {}
    return {k: cast.setdefault(v.data_ptr(), v.to(torch.bfloat16)) if v.is_floating_point() else v
            for k, v in state.items()}


def train(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Row],
    out_dir: str | Path,
    settings: SFTSettings,
    on_log: Callable[[dict], None] | None = None,
    save: bool = True,
    precision: str | None = None,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Train `model` (a transformers model, or a path to one) on `rows`; save a plain HF directory.

    Batches of similar-length rows (see `make_batches`) come in a fresh random order every epoch.
    With `settings.lora`, LoRA adapters are trained and merged into the saved weights, so every
    backend loads the result like any other checkpoint. `precision`: auto, bf16 or no (None: as
    launched, `distributed.mixed_precision`); sharding is the launch's (`distributed.make_accelerator`).
    Returns a summary with the loss log and what ran; each entry of the loss log also goes to
    `on_log` and to `tracker` (the run's experiment trackers) as the Trainer logs it.

    Resumes from the newest whole checkpoint in OUT/trainer (see the module docstring); with `save`
    the model is then published into `out_dir` and the checkpoints removed, without it the caller
    saves the returned model and removes OUT/trainer itself (until then a rerun can resume).
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    if not rows:
        raise LeafeError("no training rows: nothing to train on (check the data sets are not empty)")
    out = Path(out_dir)
    batches = make_batches([len(r.input_ids) for r in rows], settings.batch_size, settings.max_batch_tokens,
                           settings.seed)
    dataset = Dataset.from_dict({"members": batches})
    # The Trainer places the model (a freshly loaded one sits on the CPU): train on a GPU whenever there is one.
    use_cuda = torch.cuda.is_available()
    processes = process_rank()[1]  # > 1 under `accelerate launch` (leafe launch)
    precision = mixed_precision(precision)
    checkpoints = out / CHECKPOINTS
    # Without checkpoints (save_every 0) a killed run starts over, which is as deterministic.
    resume_from = resume_point(checkpoints, resume_key(model, rows, settings, precision, processes),
                               record=settings.save_every > 0)
    checkpointing = _checkpointing_field()
    config = SFTConfig(
        output_dir=str(checkpoints),
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=1,  # one prepared batch per step
        gradient_accumulation_steps=settings.grad_accum,
        warmup_steps=settings.warmup_ratio,
        lr_scheduler_type=settings.scheduler,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        save_strategy="steps" if settings.save_every else "no",
        save_steps=_save_steps(settings) if settings.save_every else 500,
        save_total_limit=None,  # `_checkpoint_callback` keeps the newest whole checkpoint
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        bf16=precision == "bf16",
        use_cpu=not use_cuda,
        dataloader_num_workers=0,
        **{checkpointing: settings.activation_checkpointing},
        ddp_find_unused_parameters=False,  # every parameter takes part in the loss (DDP: no extra graph walk)
        **settings.extra,
    )
    # Load the model only now: SFTConfig starts the process group of a multi-process launch and, under
    # ZeRO-3, registers the DeepSpeed config, which is what makes from_pretrained build the model
    # already partitioned (zero3_init_flag) instead of whole in every process. The accelerator state
    # is made here, sharded as launched (on CPU processes too); the trainer's own Accelerator reuses it.
    make_accelerator(precision)
    if isinstance(model, (str, Path)):
        with loading_model(model):
            model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lora = None
    if settings.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    trainer = _trainer_class()(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=_Collator(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        callbacks=[_checkpoint_callback(checkpoints)] + ([_progress_callback(_logged(on_log, tracker))]
                                                         if on_log or tracker else []),
    )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress goes through `on_log`, not raw dicts on stdout
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.perf_counter() - started
    resumed_at = int(resume_from.name.removeprefix("checkpoint-")) if resume_from else 0
    history = trainer.state.log_history  # a resumed run's holds the logs before its checkpoint too
    trained = trainer.model
    if settings.lora and processes > 1:
        # The adapters may be split over the ranks (FSDP): gather the whole adapted state on rank 0,
        # which merges W + scaling * B @ A into a plain model and writes it.
        state = trainer.accelerator.get_state_dict(trainer.model)
        if save and is_main_process():
            peft_model = trainer.accelerator.unwrap_model(trainer.model)
            base = peft_model.get_base_model()
            merged = without_tied_head(merge_lora(state, lora_scaling(peft_model)), base)
            _publish(out, base, bf16_state(merged) if config.bf16 else merged, tokenizer)
        save = False
    elif settings.lora:
        trained = trained.merge_and_unload()
    if save:
        # The whole weights (gathered first when sharded), written by rank 0 as a plain directory, in
        # bf16 when trained in bf16: the model a user keeps, not the fp32 master copy.
        state = trainer.accelerator.get_state_dict(trainer.model) if processes > 1 else trained.state_dict()
        if is_main_process():
            writer = trainer.accelerator.unwrap_model(trained) if processes > 1 else trained
            state = without_tied_head(state, writer)
            _publish(out, writer, bf16_state(state) if config.bf16 else state, tokenizer)
    return {
        "rows": len(rows),
        "tokens": sum(len(r.input_ids) for r in rows),
        "loss_tokens": sum(r.loss_tokens for r in rows),
        "steps": result.global_step,
        "train_loss": (None if math.isnan(result.training_loss)
                       else _run_loss(history, result.training_loss, result.global_step, resumed_at)),
        "resumed_from_step": resumed_at,
        "wall_s": round(wall, 2),
        "ran": ran(trainer.accelerator),
        "log": [_log_entry(logged, trainer.state.max_steps) for logged in history if "loss" in logged],
        "model": trained,
    }
