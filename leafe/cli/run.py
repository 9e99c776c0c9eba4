"""`leafe run CONFIG`: the whole study, with a live display of its stages; `--dry-run` checks the config
and prints the stage plan and what each stage asks of the GPUs (`leafe.study.budget`) without importing
torch."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from leafe.cli.app import BarProgress, app, console, quiet_transformers


@app.command("run")
def run_cmd(
    config: Annotated[Path, typer.Argument(help="Study config (YAML), e.g. configs/sokoban-demo.yaml.")],
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
    from leafe.study.plan import Study

    study_config = load_config(config, overrides or [])
    if model is not None:
        study_config = study_config.model_copy(update={"model": model})
    run_dir = out or Path("runs") / study_config.name
    study = Study(study_config, run_dir)
    stages = study.plan()
    study.check_inputs()  # env, its parameters, model and data paths: before any stage runs
    if dry_run:
        console.print(stage_plan_table(study, stages))
        console.print(resource_table(budget.plan(study_config, study)))
    budget.check(study_config, study)  # a config that cannot fit fails now, not hours into a stage
    if dry_run:
        return
    quiet_transformers()
    started = time.perf_counter()
    progress = Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("[bold]{task.description}"),
                        BarColumn(bar_width=16), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[status]}"), console=console)
    overall = progress.add_task(f"study {study_config.name}", total=len(stages), status="")

    current: list[Any] = []
    live = console.is_terminal  # a log file gets one plain line per stage instead of a live display

    def finish_current() -> None:
        if current:
            total = progress.tasks[current[-1]].total or 1
            progress.update(current[-1], total=total, completed=total)

    def progress_for(index: int, total: int, stage, state: str):
        finish_current()
        progress.update(overall, completed=index, status=f"stage {index + 1}/{total}: {stage.key}")
        label = f"{index + 1}. {stage.title}"
        note = {"done": "done earlier, skipped", "partial": "resuming", "stale": "config changed: redoing"}.get(state, "")
        if not live:
            console.print(f"[{_clock(time.perf_counter() - started)}] stage {index + 1}/{total} {stage.key}"
                          + (f": {note}" if note else ""))
        if state == "done":
            current.append(progress.add_task(label, total=1, completed=1, status=f"[dim]{note}"))
            return NoProgress()
        current.append(progress.add_task(label, total=None, status=note))
        return BarProgress(progress, current[-1])

    with Live(progress, console=console, refresh_per_second=4) if live else contextlib.nullcontext():
        results = study.run(progress_for)
        finish_current()
        progress.update(overall, completed=len(stages), status="done")
    console.print(results_table(results))
    console.print(f"{_clock(time.perf_counter() - started)} in all; results: {run_dir / 'results.json'}; "
                  f"report: {run_dir / 'report.html'}")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def stage_plan_table(study, stages) -> Table:
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


def resource_table(plan) -> Table:
    """Per stage: the GPUs it uses, what each holds (GB), the tokens it generates at most, and hours."""
    table = Table(title=f"resources ({plan.checked})")
    for name in ("stage", "GPUs", "weights", "KV cache", "optimizer", "activations", "total/GPU",
                 "tokens (at most)", "hours"):
        table.add_column(name, no_wrap=name == "stage", justify="left" if name == "stage" else "right")
    table.add_column("note")
    for s in plan.stages:
        table.add_row(s.key, str(s.gpus), _gb(s.weights), "?" if s.kv is None else _gb(s.kv), _gb(s.optimizer),
                      _gb(s.activations), _gb(s.total) if s.kv is not None else "?",
                      "-" if s.tokens is None else f"{s.tokens:.3g}", "-" if s.hours is None else f"{s.hours:.1f}",
                      s.note)
    table.caption = plan.assumption
    return table


def _gb(value: float) -> str:
    return f"{value / 1e9:.1f} GB" if value else "-"


def results_table(results: dict[str, Any]) -> Table:
    from leafe.study.report import NAMES, ks_of

    methods = results["methods"]
    ks = ks_of(methods)
    table = Table(title=f"{results['env']}: {results['tasks']} held-out tasks x {results['samples']} samples")
    table.add_column("method")
    for k in ks:
        table.add_column(f"Pass@{k}", justify="right")
    # Pass@1 and the largest k against the base, paired on tasks: what the acceptance reads.
    paired = [k for k in dict.fromkeys(ks[:1] + ks[-1:]) if any(k in m.get("vs_base", {}) for m in methods.values())]
    for k in paired:
        table.add_column(f"@{k} vs base", justify="right")
    for name, m in methods.items():
        vs = m.get("vs_base", {})
        table.add_row(NAMES.get(name, name), *(f"{100 * m['pass_at_k'][k]:.1f}" if k in m["pass_at_k"] else "-"
                                               for k in ks),
                      *(f"{100 * vs[k]['diff']:+.1f} [{100 * vs[k]['ci95'][0]:+.1f}, {100 * vs[k]['ci95'][1]:+.1f}]"
                        if k in vs else "-" for k in paired))
    notes = [f"{NAMES.get(name, name)}: {m['note']}" for name, m in methods.items() if m.get("note")]
    if paired:
        notes.insert(0, "vs base: points above the base on the same tasks [95% CI, tasks resampled in pairs]")
    if notes:
        table.caption = "; ".join(notes)
    return table


