"""`leafe run CONFIG`: the whole study in one run directory, and `leafe.Study`, its Python API.

    study = Study(load_config("sokoban-demo"), "runs/demo")
    study.stages()      # what will run, with each stage's status: no model loaded (`leafe.study.stages`)
    study.run()         # run what is not done; results.json and report.html; returns the results

The stages run one at a time in this process (`leafe.study.runner`) or, with `parallel_stages`, those
that do not depend on each other side by side (`leafe.study.parallel`). Killing `leafe run` anywhere
and re-running it continues where it stopped: each stage is skipped, resumed or redone by its
fingerprint. Then the finished stages' records become results.json (every method's Pass@k against
the base's on the same tasks), the trackers and model cards get the Pass@k table, and report.html is
written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from leafe.files import expect, read_json, write_json
from leafe.method import NoProgress, Progress
from leafe.methods import registry
from leafe.passk import compare_tasks
from leafe.study.stages import Stage, StageGraph


class Study(StageGraph):
    """The stages of one config in one run directory (`StageGraph`), run and reported."""

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
        stages = self.stages()
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
            from leafe.study.runner import StageRunner, run_one_at_a_time

            run_one_at_a_time(StageRunner(self), stages, progress_for, finished)
        results = self.results(stages)
        write_json(self.out / "results.json", results)
        if ran or not reported:
            self.report_results(results)
        self.add_results_to_cards(results)
        write_report(self.out)
        return results

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

        trained_in = {c.name: c.stage_key(c.stages[-1]) for c in registry.compared()
                      if c.stages and c.stages[-1].trains}
        for method, entry in results["methods"].items():
            own = self.stage_dir(trained_in[method]) if method in trained_in else None
            if own is not None and self.model_of(method) == own:
                add_results(own, PassAtK(results["env"], results["tasks"], results["samples"], entry["pass_at_k"],
                                         entry.get("ci95")))

    def results(self, stages: list[Stage] | None = None) -> dict[str, Any]:
        """results.json from the finished stages' records."""
        c, stages = self.config, stages or self.stages()
        evaluation = c.eval_settings()
        methods, costs, notes = {}, {}, {}
        for stage in stages:
            path = self.stage_dir(stage.key) / "stage.json"
            record = expect(read_json(path), dict, path, keys=("cost",))
            costs[stage.key] = record["cost"]
            if record.get("note"):  # a training stage's word on its method (LEAFE: nothing to distil)
                notes[stage.compared] = record["note"]
            if stage.key.endswith(".eval"):
                path = self.stage_dir(stage.key) / "eval.json"
                result = expect(read_json(path), dict, path, keys=("pass_at_k", "ci95", "tasks"))
                method = stage.compared
                methods[method] = {"pass_at_k": result["pass_at_k"], "ci95": result["ci95"],
                                   "model": record.get("model"), "tasks": result["tasks"]}
                if (start := c.start_of(method)) is not None:  # the base starts from nothing
                    methods[method] |= {"start": start, "start_model": str(self.start_model(method))}
                if record.get("same_as"):
                    methods[method]["note"] = f"no lesson learnt: the episodes of {record['same_as']}"
                if method in notes:
                    methods[method]["note"] = notes[method]
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

    def leafe_start(self) -> str:
        return self.config.leafe.start  # results.json's `leafe_start`, from before every method had one
