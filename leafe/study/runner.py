"""Running a study's stages in this process: each stage is one call of its method through the method
contract (`leafe.method`), as the registry describes it (`leafe.methods.registry`): a `Job` with the
model it starts from and its directory under the run, its settings from the config, and what else the
method needs (a sampling engine, the trees of the stage before it, the study's tracker).

A stage records its run format and fingerprint and then its result in `stage.json`, so a stage cut
off is started again (the method resumes inside its directory) and one that finished is skipped
(`leafe.study.stages`). One sampling engine is resident at a time: the runner keeps the last one and
reuses it while stages sample the same model, and shuts it down before a training stage loads its own.

`run_one_at_a_time` runs the stages in order; `leafe.study.parallel` runs independent ones side by side,
each in a process of its own with a runner of its own.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from leafe.errors import LeafeError
from leafe.files import read_json, write_json
from leafe.method import Job, MethodResult, Progress, cost
from leafe.methods import registry
from leafe.rundir import OLD_FORMAT, RUN_FORMAT
from leafe.study.stages import EVAL, Stage, StageGraph
from leafe.tracking import Tracker, stage_name


class StageRunner:
    """Runs the stages of one stage graph in this process, one at a time."""

    def __init__(self, graph: StageGraph):
        self.graph = graph
        self.config = graph.config
        self._backend: tuple[str, Any] | None = None  # one loaded model at a time (7B models are big)
        self._tracker = Tracker()  # the running stage's (`run_stage`)

    def ready_dir(self, stage: Stage, state: str) -> Path:
        """The stage's directory, made if missing and emptied first if it is `stale` or of an older run
        format."""
        where = self.graph.stage_dir(stage.key)
        if state in ("stale", OLD_FORMAT):  # the config or leafe's run format changed: nothing in it is reused
            shutil.rmtree(where)
        where.mkdir(parents=True, exist_ok=True)
        return where

    def run_stage(self, stage: Stage, state: str, progress: Progress) -> None:
        """Run one stage that is not done (`state` from `StageGraph.status`), recording it in its stage.json."""
        where = self.ready_dir(stage, state)
        header = {"stage": stage.key, "format": RUN_FORMAT, "digest": stage.digest(), "fingerprint": stage.fingerprint}
        started = time.time()
        write_json(where / "stage.json", {**header, "done": False, "started": started})
        # The stage reports to the study's tracker run from whichever process runs it (this one, or its
        # own beside others'), under its own name; `_job` hands the tracker to the method.
        self._tracker = self.graph.tracking().open(stage_name(stage.key))
        try:
            result, extra = self._call(stage, progress)
        finally:
            self._tracker.close()
            self._tracker = Tracker()
        write_json(where / "stage.json", {**header, "done": True, "started": started, "ended": time.time(),
                                          **result.to_dict(), **extra})

    def release(self) -> None:
        """Shut the running engine down and give its memory back (before a training stage loads its
        model, between engines of different models, and when the stages are done)."""
        if self._backend is not None:
            from leafe.backends.base import release_memory

            backend, self._backend = self._backend[1], None
            backend.close()
            del backend
            release_memory()

    # -- the calls -----------------------------------------------------------------------------
    def _call(self, stage: Stage, progress: Progress) -> tuple[MethodResult, dict[str, Any]]:
        """-> the method's result and what else stage.json records (a note, `same_as`, `trained`)."""
        if stage.method == "bootstrap":
            return self._bootstrap(progress)
        if stage.method == EVAL:
            return self._eval(stage.compared, progress)
        if stage.method == "distill":
            return self._distill(stage, progress)
        return self._method(stage, progress), {}

    def _job(self, key: str, model: Path | str, progress: Progress, **more: Any) -> Job:
        # A training stage in this process puts its model on generation's `device`; over
        # `training.processes` each rank takes the GPU of its LOCAL_RANK (leafe.scale.stage).
        return Job(model=str(model), out=self.graph.stage_dir(key), progress=progress,
                   device=self.config.generation_settings().device, release=self.release,
                   precision=self.config.training_settings().mixed_precision, tracker=self._tracker, **more)

    def _load(self, model: Path):
        """The engine for `model` (the config's `generation:`), reusing the running one when it
        serves the same model; any other is shut down first, so one model is resident at a time."""
        if self._backend is not None and self._backend[0] == str(model):
            return self._backend[1]
        self.release()
        from leafe.backends import backend_for

        if not model.exists():
            raise LeafeError(f"model {model} does not exist; set `model:` in the config to a model directory")
        backend = backend_for(str(model), self.config.generation_settings())
        self._backend = (str(model), backend)
        return backend

    def _method(self, stage: Stage, progress: Progress) -> MethodResult:
        """A compared method's stage, as its registry entry says: a method given an engine samples
        with the running one (loaded for the model it starts from); any other loads its own model, so
        the engine goes first. Over `training.processes`, a launched method runs on that many
        processes (`leafe.scale.stage`), or its SFT does."""
        method = registry.get(stage.method)
        start = self.graph.start_model(stage.compared)
        more: dict[str, Any] = {}
        if "engine" in method.needs:
            more["backend"] = self._load(start)
        else:
            self.release()
        if "trees" in method.needs:  # the trees of the stage before it, LEAFE's exploration
            before = next(k for k in stage.after if k.startswith(f"{stage.compared}."))
            more["inputs"] = [self.graph.stage_dir(before) / "trees.jsonl"]
        job = self._job(stage.key, start, progress, **more)
        settings = self.config.settings_of(method)
        generation = {"generation": self.config.generation_settings()} if "generation" in method.needs else {}
        training = self.config.training_settings()
        if training.world > 1 and method.launch == "method":
            from leafe.scale.stage import launch

            return launch(method.name, job, training, **settings, **generation)
        if training.world > 1 and method.launch == "sft":
            from leafe.scale.stage import sft_launcher

            job.train_sft = sft_launcher(training, job.device)
        return method.load()(job, *settings.values(), **generation)

    def _bootstrap(self, progress: Progress) -> tuple[MethodResult, dict[str, Any]]:
        from leafe.settings import BootstrapConfig

        bootstrap = registry.get("bootstrap").load()
        result = bootstrap(Job(model="", out=self.graph.base_model(), progress=progress), BootstrapConfig())
        # A cached agent costs nothing now; its build time is in its bootstrap.json.
        return result, {"build_wall_s": result.data.get("wall_s")}

    def _eval(self, method: str, progress: Progress) -> tuple[MethodResult, dict[str, Any]]:
        from leafe.methods.ace import load_playbook

        evaluate = registry.get(EVAL).load()
        settings = self.config.eval_settings()
        if method == "ace":
            settings = replace(settings, playbook=load_playbook(self.graph.stage_dir("ace.train") / "playbook.json"))
            start = f"{self.config.start_of('ace')}.eval"
            if not settings.playbook and (result := self._copy_start_eval(start)) is not None:
                copied = MethodResult("eval", str(self.graph.model_of("ace")), asdict(settings), result, cost())
                return copied, {"same_as": start}
        model = self.graph.model_of(method)
        return evaluate(self._job(f"{method}.eval", model, progress, backend=self._load(model)), settings), {}

    def _copy_start_eval(self, key: str) -> dict[str, Any] | None:
        """Copy the evaluation `key` of ACE's starting model (base.eval or grpo.eval) as ACE's, when
        ACE learnt no lesson, and return its result. An empty playbook leaves the system prompt, the
        model and the sampling seeds those of that evaluation, so evaluating again would play the very
        same episodes. None when that evaluation has not finished."""
        source = self.graph.stage_dir(key)
        if not (source / "eval.json").exists() or not read_json(source / "stage.json").get("done"):
            return None
        target = self.graph.stage_dir("ace.eval")
        target.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            if path.is_file() and path.name not in ("stage.json", "stage.log"):
                shutil.copyfile(path, target / path.name)
        return read_json(source / "eval.json")

    def _distill(self, stage: Stage, progress: Progress) -> tuple[MethodResult, dict[str, Any]]:
        from leafe.methods.distill import NoDistillationRows

        try:
            return self._method(stage, progress), {"trained": True}
        except NoDistillationRows as empty:
            # Nothing succeeded in stage 1: there is no correction to distil, so LEAFE's model is its
            # starting checkpoint. Said in the record, results.json and the report, never hidden.
            counts = empty.counts
            note = (f"stage 1 produced no distillation rows ({counts['branches']} branches, "
                    f"{counts['successful_episodes']} successful episodes): LEAFE is its starting checkpoint")
            start = self.graph.start_model(stage.compared)
            return MethodResult("distill", str(start), {}, {"counts": counts}, cost()), {"trained": False, "note": note}


def run_one_at_a_time(runner: StageRunner, stages: list[Stage],
                      progress_for: Callable[[int, int, Stage, str], Progress],
                      on_finish: Callable[[Stage], None]) -> None:
    """Run the stages not already done, in order, in this process (see `Study.run` for the callbacks)."""
    for i, stage in enumerate(stages):
        state = runner.graph.status(stage)
        progress = progress_for(i, len(stages), stage, state)
        if state != "done":
            runner.run_stage(stage, state, progress)
            on_finish(stage)
    runner.release()
