"""`leafe run CONFIG`: the whole study in one run directory, one stage at a time.

    bootstrap (cached) -> base eval -> GRPO -> LEAFE stage 1 (from GRPO's checkpoint) -> distillation
    -> Early Experience -> ACE -> eval of every method -> results.json -> report.html

Each stage writes into its own directory of the run and, when it finishes, a `stage.json` there
holding its fingerprint (its settings plus the fingerprints of the stages it reads from) and its
cost. A stage whose `stage.json` matches is skipped; one that was cut off is started again and
resumes inside (evaluation by task, exploration by tree, GRPO from its last checkpoint, ACE by
round). A stage whose recorded fingerprint differs from the config (the config changed) has its
directory cleared and is redone, and so is everything downstream of it, because the fingerprints
chain. So killing `leafe run` anywhere and re-running it continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from leafe.errors import LeafeError
from leafe.files import read_json, write_json
from leafe.fingerprint import fingerprint_fields as _fp
from leafe.passk import compare_tasks
from leafe.study.config import EMBEDDED, StudyConfig


class Ticker:
    """Progress of the running stage, as the display wants it: a total and a count done."""

    def start(self, total: int | None, done: int = 0) -> None: ...

    def advance(self, n: int = 1, status: str = "") -> None: ...


@dataclass
class Stage:
    key: str  # e.g. "grpo.train"; also the stage's directory under the run (dots -> slashes)
    title: str
    fingerprint: dict[str, Any]
    run: Callable[[Ticker], dict[str, Any]]  # -> {"cost": {...}, ...}; the stage's own summary

    def digest(self) -> str:
        return _digest(self.fingerprint)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cost(env_steps: int = 0, generated_tokens: int = 0, wall_s: float = 0.0) -> dict[str, Any]:
    return {"env_steps": int(env_steps), "generated_tokens": int(generated_tokens), "wall_s": round(float(wall_s), 2)}


class Study:
    """The stage plan of one config in one run directory, and its execution."""

    def __init__(self, config: StudyConfig, out: str | Path):
        self.config = config
        self.out = Path(out)
        self._backend: tuple[str, Any] | None = None  # one loaded model at a time (7B models are big)

    # -- paths ---------------------------------------------------------------------------------
    def stage_dir(self, key: str) -> Path:
        return self.out / key.replace(".", "/")

    def model_of(self, method: str) -> Path:
        """Where a method's model lives (ACE has none of its own: it is the base with a playbook)."""
        if method in ("base", "ace"):
            return self.base_model()
        if method == "leafe":
            record = self.stage_dir("leafe.distill") / "stage.json"
            if record.exists() and read_json(record).get("trained") is False:
                return self.model_of(self.leafe_start())  # stage 1 found nothing to distil
            return self.stage_dir("leafe.distill")
        return self.stage_dir(f"{method}.train")

    def base_model(self) -> Path:
        if self.config.model == EMBEDDED:
            from leafe.base_agent.bootstrap import BootstrapConfig, default_cache_dir

            return Path(default_cache_dir()) / f"base-agent-{BootstrapConfig().digest()}"
        return Path(self.config.model)

    def leafe_start(self) -> str:
        return self.config.leafe.start  # config.check() has made sure GRPO runs when it is "grpo"

    # -- the plan ------------------------------------------------------------------------------
    def plan(self) -> list[Stage]:
        c = self.config
        stages: list[Stage] = []
        by_key: dict[str, Stage] = {}

        def add(key: str, title: str, settings: Any, run: Callable[[Ticker], dict], after: tuple[str, ...] = ()) -> None:
            fingerprint = {"settings": settings, "after": {k: by_key[k].digest() for k in after}}
            stage = Stage(key, title, json.loads(json.dumps(fingerprint, default=str)), run)
            stages.append(stage)
            by_key[key] = stage

        base_after: tuple[str, ...] = ()
        if c.model == EMBEDDED:
            from leafe.base_agent.bootstrap import BootstrapConfig

            add("bootstrap", "bootstrap base agent", _fp(BootstrapConfig()), self._bootstrap)
            base_after = ("bootstrap",)
        model_fp = {"model": c.model, "gguf_file": c.gguf_file, "dtype": c.dtype}
        evaluation = c.eval_settings()
        add("base.eval", "eval base", {"eval": _fp(evaluation), **model_fp},
            lambda t: self._eval("base", t), base_after)
        if "grpo" in c.methods:
            add("grpo.train", "GRPO", {"grpo": _fp(c.grpo_settings()), **model_fp}, self._grpo, base_after)
        if "leafe" in c.methods:
            start_after = ("grpo.train",) if self.leafe_start() == "grpo" else base_after
            add("leafe.explore", f"LEAFE explore ({self.leafe_start()})",
                {"explore": _fp(c.explore_settings()), **model_fp}, self._explore, start_after)
            add("leafe.distill", "LEAFE distil", {"distill": _fp(c.distill_settings()),
                "sft": _fp(c.distill_sft()), **model_fp}, self._distill, ("leafe.explore", *start_after))
        if "early_experience" in c.methods:
            add("early_experience.train", f"Early Exp. ({c.early_experience.variant})",
                {"ee": _fp(c.early_experience_settings()), "sft": _fp(c.early_experience_sft()), **model_fp},
                self._early_experience, base_after)
        if "ace" in c.methods:
            add("ace.train", "ACE playbook", {"ace": _fp(c.ace_settings()), **model_fp}, self._ace,
                base_after)
        trained = {"grpo": "grpo.train", "leafe": "leafe.distill", "early_experience": "early_experience.train",
                   "ace": "ace.train"}
        for method in c.methods:
            if method != "base":
                add(f"{method}.eval", f"eval {method}", {"eval": _fp(evaluation), **model_fp},
                    lambda t, m=method: self._eval(m, t), (trained[method],))
        return stages

    # -- execution -----------------------------------------------------------------------------
    def status(self, stage: Stage) -> str:
        """done | partial (started with these settings) | stale (other settings) | todo"""
        path = self.stage_dir(stage.key) / "stage.json"
        if not path.exists():
            return "todo"
        record = read_json(path)
        if record.get("digest") != stage.digest():
            return "stale"
        if stage.key == "bootstrap" and not (self.base_model() / "bootstrap.json").exists():
            return "todo"  # the cached agent lives outside the run and was deleted: build it again
        return "done" if record.get("done") else "partial"

    def run(self, ticker_for: Callable[[int, int, Stage, str], Ticker] | None = None) -> dict[str, Any]:
        """Run every stage not already done; write results.json and report.html; return the results.

        `ticker_for(index, total, stage, status)` is called as each stage begins and returns the
        progress sink for it (the CLI's live display); `status` says whether it is skipped.
        """
        from leafe.study.report import write_report

        if self.config.model != EMBEDDED and not self.base_model().exists():
            raise LeafeError(f"model {self.base_model()} does not exist; set `model:` in the config to a local "
                             f"model directory or pass --model DIR (nothing is downloaded at run time)")
        self.out.mkdir(parents=True, exist_ok=True)
        stages = self.plan()
        for i, stage in enumerate(stages):
            state = self.status(stage)
            ticker = ticker_for(i, len(stages), stage, state) if ticker_for else Ticker()
            if state == "done":
                continue
            where = self.stage_dir(stage.key)
            if state == "stale":  # the config changed under this stage: its outputs are not the config's
                shutil.rmtree(where)
            where.mkdir(parents=True, exist_ok=True)
            header = {"stage": stage.key, "digest": stage.digest(), "fingerprint": stage.fingerprint}
            write_json(where / "stage.json", {**header, "done": False})
            started = time.perf_counter()
            summary = stage.run(ticker)
            summary.setdefault("cost", _cost(wall_s=time.perf_counter() - started))
            write_json(where / "stage.json", {**header, "done": True, **summary})
        self._release()
        results = self.results(stages)
        write_json(self.out / "results.json", results)
        write_report(self.out)
        return results

    def results(self, stages: list[Stage] | None = None) -> dict[str, Any]:
        """results.json from the finished stages' records."""
        c, stages = self.config, stages or self.plan()
        evaluation = c.eval_settings()
        methods, cost = {}, {}
        for stage in stages:
            record = read_json(self.stage_dir(stage.key) / "stage.json")
            cost[stage.key] = record["cost"]
            if stage.key.endswith(".eval"):
                result = read_json(self.stage_dir(stage.key) / "eval.json")
                method = stage.key.split(".")[0]
                methods[method] = {"pass_at_k": result["pass_at_k"], "ci95": result["ci95"],
                                   "model": record.get("model"), "tasks": result["tasks"]}
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
            "env_params": c.env_params,
            "model": str(self.base_model()),
            "tasks": evaluation.tasks,
            "task_seed": evaluation.task_seed,
            "samples": evaluation.samples,
            "temperature": evaluation.temperature,
            "train": c.train.model_dump(),
            "leafe_start": self.leafe_start() if "leafe" in c.methods else None,
            "methods": methods,
            "cost": cost,
        }

    # -- the stages ----------------------------------------------------------------------------
    def _load(self, model: Path):
        """The backend for `model`, reusing the loaded one when it is the same model."""
        if self._backend is not None and self._backend[0] == str(model):
            return self._backend[1]
        self._release()
        from leafe.backends import load_backend

        if not model.exists():
            raise LeafeError(f"model {model} does not exist; set `model:` in the config to a model directory")
        backend = load_backend("hf", str(model), device=self.config.device, dtype=self.config.dtype,
                               gguf_file=self.config.gguf_file)
        self._backend = (str(model), backend)
        return backend

    def _release(self) -> None:
        if self._backend is not None:
            self._backend = None
            import gc

            gc.collect()

    def _bootstrap(self, ticker: Ticker) -> dict[str, Any]:
        from leafe.base_agent.bootstrap import ensure_base_agent

        started = time.perf_counter()
        phases: dict[str, int] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in phases:
                phases[phase] = len(phases)
                ticker.start(total, done)
            ticker.advance(0, status=f"{phase} {done}/{total}")

        path = ensure_base_agent(report=report)
        built = read_json(path / "bootstrap.json")
        # A cached agent cost nothing now; its build time is in its bootstrap.json.
        return {"model": str(path), "cost": _cost(wall_s=time.perf_counter() - started),
                "build_wall_s": built.get("wall_s")}

    def _eval(self, method: str, ticker: Ticker) -> dict[str, Any]:
        from leafe.methods.ace import load_playbook
        from leafe.methods.evaluate import evaluate

        settings = self.config.eval_settings()
        if method == "ace":
            settings = replace(settings, playbook=load_playbook(self.stage_dir("ace.train") / "playbook.json"))
            if not settings.playbook and (result := self._copy_base_eval()) is not None:
                return {"model": str(self.base_model()), "pass_at_k": result["pass_at_k"], "cost": _cost(),
                        "same_as": "base.eval"}
        model = self.model_of(method)
        solved = [0, 0]

        def on_episode(episode) -> None:
            solved[0] += episode.success
            solved[1] += 1
            ticker.advance(status=f"solved {solved[0]}/{solved[1]}")

        result = evaluate(self._load(model), str(model), settings, self.stage_dir(f"{method}.eval"),
                          on_episode=on_episode, on_start=ticker.start)
        return {"model": str(model), "pass_at_k": result["pass_at_k"],
                "cost": _cost(result["env_steps"], result["generated_tokens"], result["wall_s"])}

    def _copy_base_eval(self) -> dict[str, Any] | None:
        """Copy the base evaluation's files as ACE's, when ACE learnt no lesson, and return its
        result. An empty playbook leaves the system prompt, the model and the sampling seeds those of
        the base evaluation, so evaluating again would play the very same episodes (it did, Pass@k
        equal to every digit, for minutes of the demo's 25). None when the base evaluation has not
        finished."""
        base = self.stage_dir("base.eval")
        if not (base / "eval.json").exists() or not read_json(base / "stage.json").get("done"):
            return None
        target = self.stage_dir("ace.eval")
        target.mkdir(parents=True, exist_ok=True)
        for path in base.iterdir():
            if path.is_file() and path.name != "stage.json":
                shutil.copyfile(path, target / path.name)
        return read_json(base / "eval.json")

    def _grpo(self, ticker: Ticker) -> dict[str, Any]:
        from leafe.methods.grpo import train_grpo

        self._release()  # GRPO loads the model it trains itself
        summary = train_grpo(str(self.base_model()), self.config.grpo_settings(), self.stage_dir("grpo.train"),
                             device=self.config.device, on_start=ticker.start,
                             on_step=lambda r: ticker.advance(status=f"success {r['success']:.2f}"))
        return {"data": summary["data"], "final": summary["final"], "cost": summary["cost"]}

    def _explore(self, ticker: Ticker) -> dict[str, Any]:
        from leafe.methods.explore import explore

        model = self.model_of(self.leafe_start())
        solved = [0, 0]

        def on_task(record: dict) -> None:
            solved[0] += record["success"]
            solved[1] += 1
            ticker.advance(status=f"solved {solved[0]}/{solved[1]}")

        summary = explore(self._load(model), str(model), self.config.explore_settings(),
                          self.stage_dir("leafe.explore"), on_task=on_task, on_start=ticker.start)
        return {"model": str(model), "summary": summary,
                "cost": _cost(summary["env_steps"], summary["generated_tokens"], summary["wall_s"])}

    def _distill(self, ticker: Ticker) -> dict[str, Any]:
        from leafe.methods.distill import NoDistillationRows, distill

        self._release()
        start = self.model_of(self.leafe_start())

        def on_log(entry: dict) -> None:
            ticker.start(entry["max_steps"], entry["step"])
            ticker.advance(0, status=f"loss {entry['loss']:.3f}")

        try:
            summary = distill(str(start), [self.stage_dir("leafe.explore") / "trees.jsonl"],
                              self.stage_dir("leafe.distill"), self.config.distill_settings(),
                              self.config.distill_sft(), on_log=on_log)
        except NoDistillationRows as empty:
            # Nothing succeeded in stage 1: there is no correction to distil, so LEAFE's model is its
            # starting checkpoint. Said in the record, results.json and the report, never hidden.
            counts = empty.counts
            note = (f"stage 1 produced no distillation rows ({counts['branches']} branches, "
                    f"{counts['successful_episodes']} successful episodes): LEAFE is its starting checkpoint")
            return {"model": str(start), "trained": False, "note": note, "cost": _cost()}
        return {"model": str(start), "trained": True, "sets": summary["sets"], "cost": _cost(wall_s=summary["wall_s"])}

    def _early_experience(self, ticker: Ticker) -> dict[str, Any]:
        from leafe.methods.early_experience import train_early_experience

        base = self.base_model()
        ticker.start(None)
        summary = train_early_experience(self._load(base), str(base), self.config.early_experience_settings(),
                                         self.config.early_experience_sft(), self.stage_dir("early_experience.train"),
                                         on_phase=lambda name: ticker.advance(0, status=name))
        cost = summary["cost"]
        return {"data": summary["data"], "cost": _cost(cost["env_steps"], cost["generated_tokens"], cost["wall_s"])}

    def _ace(self, ticker: Ticker) -> dict[str, Any]:
        from leafe.methods.ace import train_ace

        base = self.base_model()

        def on_round(record: dict) -> None:
            ticker.start(record["total"], record["round"])
            ticker.advance(0, status=f"{record['lessons']} lessons")

        summary = train_ace(self._load(base), str(base), self.config.ace_settings(), self.stage_dir("ace.train"),
                            on_round=on_round)
        return {"data": summary["data"], "cost": summary["cost"]}
