"""What a study's stages are, apart from running them: their order, what each waits for, its
fingerprint, its directory and whether it is done. `leafe run --dry-run` prints this and the resource
planner (`leafe.study.budget`) sizes it; the runners (`leafe.study.runner`, `leafe.study.parallel`)
execute it. Nothing here loads a model or a method.

    bootstrap (cached) -> base eval -> GRPO -> LEAFE stage 1 -> distillation -> Early Experience -> ACE
    -> eval of every method

The stages come from the method registry (`leafe.methods.registry`): each compared method's stages in
the registry's order, then the evaluation of each method in the config's order. LEAFE, Early
Experience and ACE start from GRPO's checkpoint, as the paper ran them (`<method>.start: grpo`;
`base` starts one from the base model): each reads GRPO's model, so its stage comes after
`grpo.train` and its fingerprint chains to GRPO's.

A stage's fingerprint is its settings plus the digests of the stages it reads from. Resume follows
`leafe.rundir`: a stage whose `stage.json` matches is done; one that was cut off is `partial`; one
whose fingerprint differs (the config changed) is `stale`, and so is everything downstream, because
the fingerprints chain; one written in another run format (`leafe.rundir.RUN_FORMAT`: an older
leafe's) is redone too, with one line saying so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leafe.errors import LeafeError
from leafe.files import read_json
from leafe.fingerprint import fingerprint_fields as _fp
from leafe.methods import registry
from leafe.methods.registry import BASE, Method
from leafe.rundir import digest, stage_note, stage_status
from leafe.study.config import EMBEDDED, StudyConfig
from leafe.tracking import Tracking

#: The registry's evaluation: the last stage of every compared method.
EVAL = "eval"


def _engine_fp(generation: Any) -> dict[str, Any]:
    """What of the engine can change what a sampling stage samples (not where or how fast it runs)."""
    return {"backend": generation.backend, "tensor_parallel_size": generation.tensor_parallel_size,
            "max_model_len": generation.max_model_len}


@dataclass
class Stage:
    key: str  # e.g. "grpo.train"; also the stage's directory under the run (dots -> slashes)
    title: str
    fingerprint: dict[str, Any]
    method: str  # the registry method it calls: "grpo", "eval", "bootstrap"
    compared: str  # the compared method it belongs to ("base" for the bootstrap), or evaluates
    #: Stages that must have finished before this one starts: the ones it reads from (in its
    #: fingerprint), and any it only waits for (ACE's evaluation copies its start's when it can).
    after: tuple[str, ...] = ()

    def digest(self) -> str:
        return digest(self.fingerprint)


class StageGraph:
    """The stages of one config in one run directory, and where each one's model and files are."""

    def __init__(self, config: StudyConfig, out: str | Path):
        self.config = config
        self.out = Path(out)
        self._pin_date()

    def _pin_date(self) -> None:
        """A template that writes today's date (Llama 3.1) renders the date of the run's first day,
        recorded in run.json, on every day the run resumes."""
        from leafe.chat import template_reads_date, today_string

        c = self.config
        if c.date_string is not None or c.model == EMBEDDED or not template_reads_date(c.model):
            return
        record = self.out / "run.json"
        c.date_string = (read_json(record).get("date_string") if record.exists() else None) or today_string()

    # -- paths ---------------------------------------------------------------------------------
    def stage_dir(self, key: str) -> Path:
        return self.out / key.replace(".", "/")

    def last_stage(self, method: str) -> str:
        """The stage whose output is `method`'s (what its evaluation waits for)."""
        own = next(c for c in registry.compared() if c.name == method)
        return own.stage_key(own.stages[-1])

    def model_of(self, method: str) -> Path:
        """Where a method's model lives: its last stage's directory when that stage trains (and did:
        LEAFE's distillation finds nothing to distil when stage 1 solved nothing), else the model it
        started from (ACE's playbook goes with its starting model)."""
        if method == BASE:
            return self.base_model()
        own = next(c for c in registry.compared() if c.name == method)
        last = self.stage_dir(own.stage_key(own.stages[-1]))
        if not own.stages[-1].trains:
            return self.start_model(method)
        if (last / "stage.json").exists() and read_json(last / "stage.json").get("trained") is False:
            return self.start_model(method)
        return last

    def start_model(self, method: str) -> Path:
        """The model `method` starts from: the base, or GRPO's checkpoint (its `start`)."""
        return self.model_of(self.config.start_of(method) or BASE)

    def start_stage(self, method: str, base_after: tuple[str, ...]) -> tuple[str, ...]:
        """The stage that makes the model `method` starts from (config.check() has made sure it runs):
        the last stage of its start (`grpo.train`), or what the base model waits for."""
        start = self.config.start_of(method)
        return base_after if start in (None, BASE) else (self.last_stage(start),)

    def tracking(self) -> Tracking:
        """The study's experiment trackers (`report_to`): one run, in RUN/tracking, named after the study."""
        return Tracking.of(self.config.tracking_settings().report_to, self.out / "tracking", self.config.name)

    def base_model(self) -> Path:
        if self.config.model == EMBEDDED:
            from leafe.base_agent.bootstrap import default_cache_dir
            from leafe.settings import BootstrapConfig

            return Path(default_cache_dir()) / f"base-agent-{BootstrapConfig().digest()}"
        return Path(self.config.model)

    # -- the stages ----------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        """Every stage of the study, in the order one at a time runs them."""
        c = self.config
        stages: list[Stage] = []
        by_key: dict[str, Stage] = {}

        def add(key: str, title: str, method: str, compared: str, settings: Any, after: tuple[str, ...] = (),
                waits: tuple[str, ...] = ()) -> None:
            fingerprint = {"settings": settings, "after": {k: by_key[k].digest() for k in after}}
            stage = Stage(key, title, json.loads(json.dumps(fingerprint, default=str)), method, compared,
                          after + tuple(k for k in waits if k in by_key))
            stages.append(stage)
            by_key[key] = stage

        base_after: tuple[str, ...] = ()
        if c.model == EMBEDDED:
            from leafe.settings import GENERATOR, BootstrapConfig

            # The example generator too: a new one builds another agent (the cache's name, `digest`).
            add("bootstrap", "bootstrap base agent", "bootstrap", BASE,
                {**_fp(BootstrapConfig()), "generator": GENERATOR})
            base_after = ("bootstrap",)
        evaluation = self.settings(registry.get(EVAL))
        add(f"{BASE}.eval", "eval base", EVAL, BASE, evaluation, base_after)
        for compared in registry.compared():
            if compared.name == BASE or compared.name not in c.methods:
                continue
            # Titles say where each method starts; the fingerprint records it, and the start's stage is
            # in `after`, so its digest chains.
            after = self.start_stage(compared.name, base_after)
            fields = {"start": c.start_of(compared.name), "section": c.section(compared.name)}
            for method in compared.stages:
                key = compared.stage_key(method)
                add(key, method.title.format(**fields) if method.title else f"{compared.label} {method.stage}",
                    method.name, compared.name, {**self.settings(method), "start": fields["start"]}, after)
                after = (key, *self.start_stage(compared.name, base_after))
        for method in c.methods:
            if method != BASE:
                # ACE's evaluation copies its starting model's when the playbook is empty (`leafe.study.runner`)
                add(f"{method}.eval", f"eval {method}", EVAL, method, evaluation, (self.last_stage(method),),
                    waits=(f"{c.start_of(method)}.eval",) if method == "ace" else ())
        return stages

    def settings(self, method: Method) -> dict[str, Any]:
        """A stage's fingerprinted settings: the method's own (`StudyConfig.settings_of`) and what of
        the machine changes what it computes."""
        c = self.config
        own = {method.settings_key(name): _fp(value) for name, value in c.settings_of(method).items()}
        generation = c.generation_settings()
        model_fp = {"model": c.model, "gguf_file": generation.gguf_file, "dtype": generation.dtype}
        # Another engine draws other random numbers: a sampling stage records which one sampled it.
        sampled_fp = {**model_fp, "engine": _engine_fp(generation)}
        # Several training processes change what is trained (GRPO's ranks sample their own streams,
        # distillation's optimiser steps span a batch per rank); the sharding is used only by several.
        training = c.training_settings()
        sharding = {"sharding": training.sharding} if training.world > 1 else {}
        trained_fp = {"training": {"processes": training.world, **sharding}}
        machine = sampled_fp if method.samples else model_fp if method.trains else {}
        return {**own, **machine, **(trained_fp if method.trains else {})}

    def status(self, stage: Stage) -> str:
        """done | partial (started with these settings) | stale (other settings) | old format (written
        by an older leafe: redone as stale) | todo; a stage of a newer leafe's format is refused."""
        state = stage_status(self.stage_dir(stage.key), stage.digest())
        if state == "done" and stage.key == "bootstrap" and not (self.base_model() / "bootstrap.json").exists():
            return "todo"  # the cached agent lives outside the run and was deleted: build it again
        return state

    def note(self, stage: Stage, state: str) -> str:
        """The stage's `status` in words, as the study says it when the stage begins (before a stale
        one is cleared): "done earlier, skipped", "config changed: redoing", ..."""
        return stage_note(state, self.stage_dir(stage.key))

    def check_inputs(self) -> None:
        """What a dry run can check without running: the env and its parameters (names, data paths)
        and the base model's path; one LeafeError line names the problem."""
        from leafe.envs import check_params

        check_params(self.config.env, self.config.env_params)
        if self.config.eval_env_params() != self.config.env_params:
            check_params(self.config.env, self.config.eval_env_params())
        if self.config.model != EMBEDDED and not self.base_model().exists():
            raise LeafeError(f"model {self.base_model()} does not exist; set `model:` in the config to a local "
                             f"model directory or pass --model DIR (nothing is downloaded at run time)")
