"""`leafe run CONFIG`: the whole study, with a live display of its stages; `--dry-run` checks the config
and prints the stages (`leafe.study.stages`) and what each asks of the GPUs (`leafe.study.budget`)
without importing torch."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from leafe.cli.app import BarProgress, app, console, hold_out, quiet_transformers


@app.command("run")
def run_cmd(
    config: Annotated[str, typer.Argument(help="Study config: a YAML file, or the name of a built-in one, e.g. "
                                               "sokoban-demo (`leafe configs` lists them; a file wins over a name).")],
    out: Annotated[Path | None, typer.Option(help="Run directory (default: runs/<name>).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Base model directory (overrides the config's).")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config key, e.g. --set leafe.start=base --set eval.tasks=50 (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the config, print the stage plan and its resources; run nothing.")] = False,
) -> None:
    """The whole study: bootstrap -> base eval -> GRPO -> LEAFE (explore, distil) -> Early Experience ->
    ACE -> eval of every method -> results.json -> report.html. Stages already done are skipped, so
    re-running after an interruption continues where it stopped."""

    from rich.live import Live
    from rich.progress import SpinnerColumn

    from leafe.method import NoProgress
    from leafe.study import budget
    from leafe.study.config import load_config
    from leafe.study.study import Study

    study_config = load_config(config, overrides or [])
    if model is not None:
        study_config = study_config.model_copy(update={"model": model})
    run_dir = out or Path("runs") / study_config.name
    study = Study(study_config, run_dir)
    stages = study.stages()
    study.check_inputs()  # env, its parameters, model and data paths: before any stage runs
    if dry_run:
        console.print(stage_table(study, stages))
        console.print(resource_table(budget.resources(study_config, study)))
    budget.check(study_config, study)  # a config that cannot fit fails now, not hours into a stage
    if dry_run:
        return
    training = study_config.training_settings()
    if training.machine_rank > 0:  # machine 0 runs the study; this one joins its training stages
        from leafe.scale.stage import follow

        console.print(f"machine {training.machine_rank} of {training.machines}: joining the training stages machine 0 "
                      f"launches in {run_dir} (ranks meet at {training.main_address}:{training.main_port})")
        joined = follow(run_dir, training)
        console.print(f"machine {training.machine_rank}: the study ended; joined {joined} training launch(es)")
        return  # machine 0 holds the run directory's lock; the launches this machine joins are its run
    hold_out(run_dir, "run")  # its stages' processes inherit the lock (leafe.lock: LEAFE_RUN_LOCK)
    quiet_transformers()
    started = time.perf_counter()
    progress = Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("[bold]{task.description}"),
                        BarColumn(bar_width=16), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[status]}"), console=console)
    overall = progress.add_task(f"study {study_config.name}", total=len(stages), status="")

    tasks: dict[str, Any] = {}  # stage key -> its bar
    began: dict[str, float] = {}
    running: list[str] = []  # with parallel_stages, several at once
    live = console.is_terminal  # a log file gets one plain line per stage instead of a live display

    def show_overall() -> None:
        done = sum(1 for t in tasks.values() if progress.tasks[t].finished)
        progress.update(overall, completed=done, status=", ".join(running))

    def progress_for(index: int, total: int, stage, state: str):
        label = f"{index + 1}. {stage.title}"
        note = study.note(stage, state)
        if not live:  # one line, however narrow the log's console
            console.print(f"[{_clock(time.perf_counter() - started)}] stage {index + 1}/{total} {stage.key}"
                          + (f": {note}" if note else ""), soft_wrap=True)
        if state == "done":
            tasks[stage.key] = progress.add_task(label, total=1, completed=1, status=f"[dim]{note}")
            show_overall()
            return NoProgress()
        tasks[stage.key] = progress.add_task(label, total=None, status=note)
        began[stage.key] = time.perf_counter()
        running.append(stage.key)
        show_overall()
        if live:
            return BarProgress(progress, tasks[stage.key])
        return LogProgress(progress, tasks[stage.key], stage.key, lambda: time.perf_counter() - started, console.print)

    def on_finish(stage) -> None:
        task = tasks[stage.key]
        total = progress.tasks[task].total or 1
        progress.update(task, total=total, completed=total)
        running.remove(stage.key)
        show_overall()
        if not live:
            console.print(f"[{_clock(time.perf_counter() - started)}] stage {stage.key} done in "
                          f"{_clock(time.perf_counter() - began[stage.key])}")

    with Live(progress, console=console, refresh_per_second=4) if live else contextlib.nullcontext():
        results = study.run(progress_for, on_finish)
        progress.update(overall, completed=len(stages), status="done")
    console.print(results_table(results))
    console.print(f"{_clock(time.perf_counter() - started)} in all; results: {run_dir / 'results.json'}; "
                  f"report: {run_dir / 'report.html'}")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LogProgress(BarProgress):
    """A stage's progress where stdout is a log, not a terminal (CI, `| tee`): besides the stage's
    opening line, one line every `every_s` seconds with how far it is, its status and its ETA."""

    def __init__(self, bar, task, key: str, clock, emit, every_s: float = 60.0):
        super().__init__(bar, task)
        self.key, self.clock, self.emit, self.every_s = key, clock, emit, every_s
        self.last = self.began = clock()
        self.resumed_at = 0  # items a resumed stage had done before this run (not this run's speed)

    def start(self, total: int | None, done: int = 0) -> None:
        super().start(total, done)
        self.began, self.resumed_at = self.clock(), done

    def advance(self, n: int = 1, status: str = "") -> None:
        super().advance(n, status)
        now = self.clock()
        if now - self.last < self.every_s:
            return
        self.last = now
        task = next(t for t in self.bar.tasks if t.id == self.task)
        done = f"{task.completed:.0f}/{task.total:.0f}" if task.total else f"{task.completed:.0f}"
        ran = task.completed - self.resumed_at
        eta = (f", ETA {_clock((now - self.began) / ran * (task.total - task.completed))}"
               if task.total and ran > 0 else "")
        shown = task.fields.get("status") or ""
        self.emit(f"[{_clock(now)}]   {self.key}: {done}{', ' + shown if shown else ''}{eta}")


def stage_table(study, stages) -> Table:
    table = Table(title=f"stage plan of {study.config.name} -> {study.out}")
    table.add_column("#")
    table.add_column("stage", no_wrap=True)  # keys are what --set and the run directory use: never cut
    table.add_column("what")
    table.add_column("status", no_wrap=True)
    table.add_column("directory", overflow="fold")
    for i, stage in enumerate(stages, 1):
        where = study.stage_dir(stage.key) if stage.key != "bootstrap" else study.base_model()
        table.add_row(str(i), stage.key, stage.title, study.status(stage), str(where))
    return table


def resource_table(estimate):
    """Per stage: the GPUs it uses, what each holds (GB), the tokens it generates at most, and hours;
    each stage's note under the table, so the figures keep their columns in 80-column terminals."""
    from rich import box
    from rich.console import Group
    from rich.text import Text

    table = Table(title=f"resources, GB per GPU ({estimate.checked})", box=box.SIMPLE_HEAD, padding=(0, 1),
                  pad_edge=False, collapse_padding=True)
    for name in ("stage", "GPUs", "weights", "KV", "optim", "activ", "total", "tokens", "h"):
        table.add_column(name, no_wrap=True, justify="left" if name == "stage" else "right")
    for s in estimate.stages:
        table.add_row(s.key, str(s.gpus), _gb(s.weights), "?" if s.kv is None else _gb(s.kv), _gb(s.optimizer),
                      _gb(s.activations), _gb(s.total) if s.kv is not None else "?",
                      "-" if s.tokens is None else f"{s.tokens:.1e}".replace("e+0", "e"),
                      "-" if s.hours is None else f"{s.hours:.1f}")
    notes = [Text(f"{s.key}: {s.note}") for s in estimate.stages if s.note]
    return Group(table, *notes, Text(estimate.assumption, style="dim"))


def _gb(value: float) -> str:
    return f"{value / 1e9:.1f}" if value else "-"


def results_table(results: dict[str, Any], width: int | None = None) -> Table:
    """The final table, fitted to `width` columns (the terminal's): the paired columns against the
    base and Pass@1 / Pass@k_max stay; the Pass@k between them go first when it is narrow."""
    from leafe.methods import registry
    from leafe.study.report import ks_of

    methods = results["methods"]
    ks = ks_of(methods)
    # Pass@1 and the largest k against the base, paired on tasks: what the acceptance reads.
    paired = [k for k in dict.fromkeys(ks[:1] + ks[-1:]) if any(k in m.get("vs_base", {}) for m in methods.values())]
    names = [registry.label(name) for name in methods]
    shown = _fit_ks(ks, width or console.width, max(map(len, names), default=6), len(paired))
    table = Table(title=f"{results['env']}: {results['tasks']} held-out tasks x {results['samples']} samples")
    table.add_column("method", no_wrap=True)
    for k in shown:
        table.add_column(f"Pass@{k}", justify="right", no_wrap=True)
    for k in paired:
        table.add_column(f"@{k} vs base", justify="right")
    for name, m in methods.items():
        vs = m.get("vs_base", {})
        table.add_row(registry.label(name), *(f"{100 * m['pass_at_k'][k]:.1f}" if k in m["pass_at_k"] else "-"
                                               for k in shown),
                      *(f"{100 * vs[k]['diff']:+.1f} [{100 * vs[k]['ci95'][0]:+.1f}, {100 * vs[k]['ci95'][1]:+.1f}]"
                        if k in vs else "-" for k in paired))
    notes = [f"{registry.label(name)}: {m['note']}" for name, m in methods.items() if m.get("note")]
    if paired:
        notes.insert(0, "vs base: points above the base on the same tasks [95% CI, tasks resampled in pairs]")
    if notes:
        table.caption = "; ".join(notes)
    return table




def _fit_ks(ks: list[str], width: int, name_width: int, paired: int) -> list[str]:
    """The k columns that fit beside the method names and the paired columns: all of them when they
    do; else Pass@1, Pass@k_max and as many of those between (from the largest down) as fit."""
    cell = 10  # "Pass@128" and its borders
    room = width - (name_width + 4) - paired * 17  # a paired cell wraps to "+1.2 [-0.3," / "+6.8]"
    if len(ks) * cell <= room:
        return ks
    keep = list(dict.fromkeys(ks[:1] + ks[-1:]))
    for k in reversed(ks[1:-1]):
        if (len(keep) + 1) * cell > room:
            break
        keep.append(k)
    return sorted(keep, key=int)
