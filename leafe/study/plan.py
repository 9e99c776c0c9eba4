"""`leafe run CONFIG`: the whole study in one run directory, one stage at a time (or, with
`parallel_stages`, the stages that do not depend on each other side by side: `leafe.study.parallel`).

    bootstrap (cached) -> base eval -> GRPO -> LEAFE stage 1 -> distillation -> Early Experience -> ACE
    -> eval of every method -> results.json -> report.html

LEAFE, Early Experience and ACE start from GRPO's checkpoint, as the paper ran them (`<method>.start:
grpo`; `base` starts one from the base model): each reads GRPO's model, so its stage comes after
`grpo.train` and its fingerprint chains to GRPO's.

Every stage is one call of a method through the method contract (`leafe.method`): a `Job` (the model
it starts from, its directory under the run) and its settings from the config. When it finishes, the
stage's `stage.json` holds its fingerprint (its settings plus the fingerprints of the stages it reads
from) and its result. Resume follows `leafe.rundir`: a stage whose `stage.json` matches is skipped;
one that was cut off is started again and the method resumes inside its directory; one whose
fingerprint differs (the config changed) is cleared and redone, and so is everything downstream,
because the fingerprints chain. So killing `leafe run` anywhere and re-running it continues where it
stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from leafe.errors import LeafeError
from leafe.files import expect, read_json, write_json
from leafe.fingerprint import fingerprint_fields as _fp
from leafe.method import Job, MethodResult, NoProgress, Progress, cost
from leafe.passk import compare_tasks
from leafe.rundir import digest, stage_status
from leafe.study.config import EMBEDDED, StudyConfig
from leafe.tracking import Tracker, Tracking, stage_name


def _engine_fp(generation: Any) -> dict[str, Any]:
    """What of the engine can change what a sampling stage samples (not where or how fast it runs)."""
    return {"backend": generation.backend, "tensor_parallel_size": generation.tensor_parallel_size,
            "max_model_len": generation.max_model_len}


@dataclass
class Stage:
    key: str  # e.g. "grpo.train"; also the stage's directory under the run (dots -> slashes)
    title: str
    fingerprint: dict[str, Any]
    #: -> the method's result and what else stage.json records (a note, `same_as`, `trained`)
    run: Callable[[Progress], tuple[MethodResult, dict[str, Any]]]
    #: Stages that must have finished before this one starts: the ones it reads from (in its
    #: fingerprint), and any it only waits for (ACE's evaluation copies the base's when it can).
    after: tuple[str, ...] = ()

    def digest(self) -> str:
        return digest(self.fingerprint)


class Study:
    """The stage plan of one config in one run directory, and its execution."""

    def __init__(self, config: StudyConfig, out: str | Path):
        self.config = config
        self.out = Path(out)
        self._backend: tuple[str, Any] | None = None  # one loaded model at a time (7B models are big)
        self._tracker = Tracker()  # the running stage's (`run_stage`)
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

    def model_of(self, method: str) -> Path:
        """Where a method's model lives (ACE has none of its own: it is its starting model with a playbook)."""
        if method == "base":
            return self.base_model()
        if method == "ace":
            return self.start_model("ace")
        if method == "leafe":
            record = self.stage_dir("leafe.distill") / "stage.json"
            if record.exists() and read_json(record).get("trained") is False:
                return self.start_model("leafe")  # stage 1 found nothing to distil
            return self.stage_dir("leafe.distill")
        return self.stage_dir(f"{method}.train")

    def start_model(self, method: str) -> Path:
        """The model `method` starts from: the base, or GRPO's checkpoint (its `start`)."""
        return self.model_of(self.config.start_of(method) or "base")

    def start_stage(self, method: str, base_after: tuple[str, ...]) -> tuple[str, ...]:
        """The stage that makes the model `method` starts from (config.check() has made sure GRPO runs
        when a method starts from it): `grpo.train`, or what the base model waits for."""
        return ("grpo.train",) if self.config.start_of(method) == "grpo" else base_after

    def base_model(self) -> Path:
        if self.config.model == EMBEDDED:
            from leafe.base_agent.bootstrap import default_cache_dir
            from leafe.settings import BootstrapConfig

            return Path(default_cache_dir()) / f"base-agent-{BootstrapConfig().digest()}"
        return Path(self.config.model)

    def leafe_start(self) -> str:
        return self.config.leafe.start  # results.json's `leafe_start`, from before every method had one

    # -- the plan ------------------------------------------------------------------------------
    def plan(self) -> list[Stage]:
        c = self.config
        stages: list[Stage] = []
        by_key: dict[str, Stage] = {}

        def add(key: str, title: str, settings: Any, run: Callable[[Progress], tuple], after: tuple[str, ...] = (),
                waits: tuple[str, ...] = ()) -> None:
            fingerprint = {"settings": settings, "after": {k: by_key[k].digest() for k in after}}
            stage = Stage(key, title, json.loads(json.dumps(fingerprint, default=str)), run,
                          after + tuple(k for k in waits if k in by_key))
            stages.append(stage)
            by_key[key] = stage

        base_after: tuple[str, ...] = ()
        if c.model == EMBEDDED:
            from leafe.settings import BootstrapConfig

            add("bootstrap", "bootstrap base agent", _fp(BootstrapConfig()), self._bootstrap)
            base_after = ("bootstrap",)
        generation = c.generation_settings()
        model_fp = {"model": c.model, "gguf_file": generation.gguf_file, "dtype": generation.dtype}
        # Another engine draws other random numbers: a sampling stage records which one sampled it
        # (left out for hf, so run directories from before engines were chosen stay done).
        sampled_fp = model_fp if generation.backend == "hf" else {**model_fp, "engine": _engine_fp(generation)}
        # Several training processes change what is trained (GRPO's ranks sample their own streams,
        # distillation's optimiser steps span a batch per rank); one process is left out, so run
        # directories from before the training section stay done.
        training = c.training_settings()
        trained_fp = {} if training.world == 1 else {"training": {"processes": training.world,
                                                                  "sharding": training.sharding}}
        evaluation = c.eval_settings()
        add("base.eval", "eval base", {"eval": _fp(evaluation), **sampled_fp},
            lambda t: self._eval("base", t), base_after)
        if "grpo" in c.methods:
            # GRPO's rollouts come from the config's engine too (hf: the policy itself; vllm: a synced copy)
            add("grpo.train", "GRPO", {"grpo": _fp(c.grpo_settings()), **sampled_fp, **trained_fp}, self._grpo,
                base_after)
        # Titles say where each method starts; the start's stage is in `after`, so its digest chains
        # (at `base` nothing is added: run directories from before `start` existed stay done).
        if "leafe" in c.methods:
            start_after = self.start_stage("leafe", base_after)
            add("leafe.explore", f"LEAFE explore from {c.leafe.start}",
                {"explore": _fp(c.explore_settings()), **sampled_fp}, self._explore, start_after)
            add("leafe.distill", "LEAFE distil", {"distill": _fp(c.distill_settings()),
                "sft": _fp(c.distill_sft()), **model_fp, **trained_fp}, self._distill, ("leafe.explore", *start_after))
        if "early_experience" in c.methods:
            add("early_experience.train", f"Early Exp. ({c.early_experience.variant}) from {c.early_experience.start}",
                {"ee": _fp(c.early_experience_settings()), "sft": _fp(c.early_experience_sft()), **sampled_fp,
                 **trained_fp},
                self._early_experience, self.start_stage("early_experience", base_after))
        if "ace" in c.methods:
            add("ace.train", f"ACE playbook from {c.ace.start}", {"ace": _fp(c.ace_settings()), **sampled_fp},
                self._ace, self.start_stage("ace", base_after))
        trained = {"grpo": "grpo.train", "leafe": "leafe.distill", "early_experience": "early_experience.train",
                   "ace": "ace.train"}
        for method in c.methods:
            if method != "base":
                # ACE's evaluation copies its starting model's when the playbook is empty (`_copy_start_eval`)
                add(f"{method}.eval", f"eval {method}", {"eval": _fp(evaluation), **sampled_fp},
                    lambda t, m=method: self._eval(m, t), (trained[method],),
                    waits=(f"{c.ace.start}.eval",) if method == "ace" else ())
        return stages

    # -- execution -----------------------------------------------------------------------------
    def status(self, stage: Stage) -> str:
        """done | partial (started with these settings) | stale (other settings) | todo"""
        state = stage_status(self.stage_dir(stage.key), stage.digest())
        if state == "done" and stage.key == "bootstrap" and not (self.base_model() / "bootstrap.json").exists():
            return "todo"  # the cached agent lives outside the run and was deleted: build it again
        return state

    def run(self, progress_for: Callable[[int, int, Stage, str], Progress] | None = None,
            on_finish: Callable[[Stage], None] | None = None) -> dict[str, Any]:
        """Run every stage not already done; write results.json and report.html; return the results.

        `progress_for(index, total, stage, status)` is called as each stage begins and returns the
        progress sink for it (the CLI's live display); `status` says whether it is skipped.
        `on_finish(stage)` is called as each stage that ran ends. With `parallel_stages` above 1,
        stages that do not depend on each other run side by side (`leafe.study.parallel`).
        """
        from leafe.study.report import write_report

        self.check_inputs()  # a bad env or model fails here, not after the base agent is built
        if self.config.parallel_stages > 1:
            from leafe.study.parallel import refuse_gpu

            refuse_gpu()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.config.date_string is not None and not (self.out / "run.json").exists():
            write_json(self.out / "run.json", {"date_string": self.config.date_string})
        stages = self.plan()
        progress_for = progress_for or (lambda *_: NoProgress())
        ran: list[str] = []  # the stages this call ran: a rerun with nothing to do reports nothing again
        reported = (self.out / "results.json").exists()

        def finished(stage: Stage) -> None:
            ran.append(stage.key)
            if on_finish:
                on_finish(stage)

        if self.config.parallel_stages > 1:
            from leafe.study.parallel import run_side_by_side

            run_side_by_side(self, stages, self.config.parallel_stages, progress_for, finished)
        else:
            for i, stage in enumerate(stages):
                state = self.status(stage)
                progress = progress_for(i, len(stages), stage, state)
                if state != "done":
                    self.run_stage(stage, state, progress)
                    finished(stage)
        self._release()
        results = self.results(stages)
        write_json(self.out / "results.json", results)
        if ran or not reported:
            self.report_results(results)
        self.add_results_to_cards(results)
        write_report(self.out)
        return results

    def tracking(self) -> Tracking:
        """The study's experiment trackers (`report_to`): one run, in RUN/tracking, named after the study."""
        return Tracking.of(self.config.tracking_settings().report_to, self.out / "tracking", self.config.name)

    def report_results(self, results: dict[str, Any]) -> None:
        """The Pass@k table to the trackers: `results/<method>/pass_at_k` at step k (a curve per method)."""
        by_k: dict[int, dict[str, float]] = {}
        for method, entry in results["methods"].items():
            for k, value in entry["pass_at_k"].items():
                by_k.setdefault(int(k), {})[f"{method}/pass_at_k"] = value
        with self.tracking().open("results") as tracker:
            for k in sorted(by_k):
                tracker.log(by_k[k], step=k)

    def add_results_to_cards(self, results: dict[str, Any]) -> None:
        """Each model this run trained gets its method's Pass@k in its model card (`leafe.modelcard`).
        Not the base model's (the user's), nor ACE's or an undistilled LEAFE's: their model is their
        starting checkpoint, whose card holds that checkpoint's own results."""
        from leafe.modelcard import PassAtK, add_results

        trained_in = {"grpo": "grpo.train", "leafe": "leafe.distill", "early_experience": "early_experience.train"}
        for method, entry in results["methods"].items():
            own = self.stage_dir(trained_in[method]) if method in trained_in else None
            if own is not None and self.model_of(method) == own:
                add_results(own, PassAtK(results["env"], results["tasks"], results["samples"], entry["pass_at_k"],
                                         entry.get("ci95")))

    def ready_dir(self, stage: Stage, state: str) -> Path:
        """The stage's directory, made if missing and emptied first if it is `stale`."""
        where = self.stage_dir(stage.key)
        if state == "stale":  # the config changed under this stage: its outputs are not the config's
            shutil.rmtree(where)
        where.mkdir(parents=True, exist_ok=True)
        return where

    def run_stage(self, stage: Stage, state: str, progress: Progress) -> None:
        """Run one stage that is not done (`state` from `status`), recording it in its stage.json."""
        where = self.ready_dir(stage, state)
        header = {"stage": stage.key, "digest": stage.digest(), "fingerprint": stage.fingerprint}
        started = time.time()
        write_json(where / "stage.json", {**header, "done": False, "started": started})
        # The stage reports to the study's tracker run from whichever process runs it (this one, or its
        # own beside others'), under its own name; `_job` hands the tracker to the method.
        self._tracker = self.tracking().open(stage_name(stage.key))
        try:
            result, extra = stage.run(progress)
        finally:
            self._tracker.close()
            self._tracker = Tracker()
        write_json(where / "stage.json", {**header, "done": True, "started": started, "ended": time.time(),
                                          **result.to_dict(), **extra})

    def results(self, stages: list[Stage] | None = None) -> dict[str, Any]:
        """results.json from the finished stages' records."""
        c, stages = self.config, stages or self.plan()
        evaluation = c.eval_settings()
        methods, costs = {}, {}
        for stage in stages:
            path = self.stage_dir(stage.key) / "stage.json"
            record = expect(read_json(path), dict, path, keys=("cost",))
            costs[stage.key] = record["cost"]
            if stage.key.endswith(".eval"):
                path = self.stage_dir(stage.key) / "eval.json"
                result = expect(read_json(path), dict, path, keys=("pass_at_k", "ci95", "tasks"))
                method = stage.key.split(".")[0]
                methods[method] = {"pass_at_k": result["pass_at_k"], "ci95": result["ci95"],
                                   "model": record.get("model"), "tasks": result["tasks"]}
                if (start := c.start_of(method)) is not None:  # the base starts from nothing
                    methods[method] |= {"start": start, "start_model": str(self.start_model(method))}
                if record.get("same_as"):
                    methods[method]["note"] = f"no lesson learnt: the episodes of {record['same_as']}"
                if method == "leafe":
                    distilled = read_json(self.stage_dir("leafe.distill") / "stage.json")
                    if distilled.get("note"):
                        methods[method]["note"] = distilled["note"]
        if "base" in methods:  # every method against the base on the same tasks: what the acceptance asks
            for name, m in methods.items():
                if name != "base":
                    m["vs_base"] = compare_tasks(methods["base"]["tasks"], m["tasks"], list(m["pass_at_k"]))
        return {
            "name": c.name,
            "env": c.env,
            "env_params": evaluation.env_params,  # what the held-out tasks were played with
            "model": str(self.base_model()),
            "tasks": evaluation.tasks,
            "task_seed": evaluation.task_seed,
            "samples": evaluation.samples,
            "temperature": evaluation.temperature,
            "train": {**c.train.model_dump(), "env_params": c.env_params},  # what the training stages played
            "leafe_start": self.leafe_start() if "leafe" in c.methods else None,
            "methods": methods,
            "cost": costs,
        }


    # -- the stages: each calls one method through the contract ---------------------------------
    def _job(self, key: str, model: Path | str, progress: Progress, **more: Any) -> Job:
        # A training stage in this process puts its model on generation's `device`; over
        # `training.processes` each rank takes the GPU of its LOCAL_RANK (leafe.scale.stage).
        return Job(model=str(model), out=self.stage_dir(key), progress=progress,
                   device=self.config.generation_settings().device, release=self._release,
                   precision=self.config.training_settings().mixed_precision, tracker=self._tracker, **more)

    def _load(self, model: Path):
        """The engine for `model` (the config's `generation:`), reusing the running one when it
        serves the same model; any other is shut down first, so one model is resident at a time."""
        if self._backend is not None and self._backend[0] == str(model):
            return self._backend[1]
        self._release()
        from leafe.backends import backend_for

        if not model.exists():
            raise LeafeError(f"model {model} does not exist; set `model:` in the config to a model directory")
        backend = backend_for(str(model), self.config.generation_settings())
        self._backend = (str(model), backend)
        return backend

    def _release(self) -> None:
        """Shut the running engine down and give its memory back (before a training stage loads its
        model, and between engines of different models)."""
        if self._backend is not None:
            from leafe.backends.base import release_memory

            backend, self._backend = self._backend[1], None
            backend.close()
            del backend
            release_memory()

    def _bootstrap(self, progress: Progress) -> tuple[MethodResult, dict[str, Any]]:
        from leafe.base_agent.bootstrap import bootstrap
        from leafe.settings import BootstrapConfig

        result = bootstrap(Job(model="", out=self.base_model(), progress=progress), BootstrapConfig())
        # A cached agent costs nothing now; its build time is in its bootstrap.json.
        return result, {"build_wall_s": result.data.get("wall_s")}

    def _eval(self, method: str, progress: Progress) -> tuple[MethodResult, dict[str, Any]]:
        from leafe.methods.ace import load_playbook
        from leafe.methods.evaluate import evaluate

        settings = self.config.eval_settings()
        if method == "ace":
            settings = replace(settings, playbook=load_playbook(self.stage_dir("ace.train") / "playbook.json"))
            start = f"{self.config.ace.start}.eval"
            if not settings.playbook and (result := self._copy_start_eval(start)) is not None:
                copied = MethodResult("eval", str(self.model_of("ace")), asdict(settings), result, cost())
                return copied, {"same_as": start}
        model = self.model_of(method)
        return evaluate(self._job(f"{method}.eval", model, progress, backend=self._load(model)), settings), {}

    def _copy_start_eval(self, key: str) -> dict[str, Any] | None:
        """Copy the evaluation `key` of ACE's starting model (base.eval or grpo.eval) as ACE's, when
        ACE learnt no lesson, and return its result. An empty playbook leaves the system prompt, the
        model and the sampling seeds those of that evaluation, so evaluating again would play the very
        same episodes (it did, Pass@k equal to every digit, for minutes of the demo's 25). None when
        that evaluation has not finished."""
        source = self.stage_dir(key)
        if not (source / "eval.json").exists() or not read_json(source / "stage.json").get("done"):
            return None
        target = self.stage_dir("ace.eval")
        target.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            if path.is_file() and path.name not in ("stage.json", "stage.log"):
                shutil.copyfile(path, target / path.name)
        return read_json(source / "eval.json")

    def _grpo(self, progress: Progress) -> tuple[MethodResult, dict[str, Any]]:
        from leafe.methods.grpo import train_grpo

        self._release()  # GRPO loads the model it trains itself, and its own rollout engine
        job = self._job("grpo.train", self.base_model(), progress)
        settings, generation = self.config.grpo_settings(), self.config.generation_settings()
        if (training := self.config.training_settings()).world > 1:
            from leafe.scale.stage import launch

            return launch("grpo", job, training, settings=settings, generation=generation), {}
        return train_grpo(job, settings, generation), {}

    def _explore(self, progress: Progress) -> tuple[MethodResult, dict[str, Any]]:
        from leafe.methods.explore import explore

        model = self.start_model("leafe")
        job = self._job("leafe.explore", model, progress, backend=self._load(model))
        return explore(job, self.config.explore_settings()), {}

    def _distill(self, progress: Progress) -> tuple[MethodResult, dict[str, Any]]:
        from leafe.methods.distill import NoDistillationRows, distill

        self._release()
        start = self.start_model("leafe")
        job = self._job("leafe.distill", start, progress, inputs=[self.stage_dir("leafe.explore") / "trees.jsonl"])
        try:
            if (training := self.config.training_settings()).world > 1:
                from leafe.scale.stage import launch

                return launch("distill", job, training, settings=self.config.distill_settings(),
                              sft=self.config.distill_sft()), {"trained": True}
            return distill(job, self.config.distill_settings(), self.config.distill_sft()), {"trained": True}
        except NoDistillationRows as empty:
            # Nothing succeeded in stage 1: there is no correction to distil, so LEAFE's model is its
            # starting checkpoint. Said in the record, results.json and the report, never hidden.
            counts = empty.counts
            note = (f"stage 1 produced no distillation rows ({counts['branches']} branches, "
                    f"{counts['successful_episodes']} successful episodes): LEAFE is its starting checkpoint")
            return MethodResult("distill", str(start), {}, {"counts": counts}, cost()), {"trained": False, "note": note}

    def _early_experience(self, progress: Progress) -> tuple[MethodResult, dict[str, Any]]:
        from leafe.methods.early_experience import train_early_experience

        start = self.start_model("early_experience")  # samples the alternatives, and is what the SFT trains
        job = self._job("early_experience.train", start, progress, backend=self._load(start))
        if (training := self.config.training_settings()).world > 1:  # its SFT over the processes
            from leafe.scale.stage import sft_launcher

            job.train_sft = sft_launcher(training, job.device)
        return train_early_experience(job, self.config.early_experience_settings(),
                                      self.config.early_experience_sft()), {}

    def _ace(self, progress: Progress) -> tuple[MethodResult, dict[str, Any]]:
        from leafe.methods.ace import train_ace

        start = self.start_model("ace")  # plays the rounds; the playbook is evaluated with it
        job = self._job("ace.train", start, progress, backend=self._load(start))
        return train_ace(job, self.config.ace_settings()), {}

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
