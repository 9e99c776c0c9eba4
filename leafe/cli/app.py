"""The `leafe` Typer app, its progress displays, and the one place where bad input becomes one line.

Every error a user can cause derives from `LeafeError` (a bad option, a corrupt file, a model that
does not load) or is an `OSError` naming a path, or is a full disk, whichever library met it;
`LeafeGroup` prints it as one line on stderr and exits with status 2, for every command. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperGroup

from leafe.errors import LeafeError
from leafe.files import disk_full_error, is_main_process, process_rank


class LeafeGroup(TyperGroup):
    """The `leafe` command group: the one place where an error the user caused becomes one line on
    stderr and exit status 2, whichever command raised it."""

    def invoke(self, ctx):
        try:
            with contextlib.ExitStack() as held:  # what the command holds till it ends (`hold_out`)
                token = _held.set(held)
                try:
                    return super().invoke(ctx)
                finally:
                    _held.reset(token)
        except Exception as exc:
            if not isinstance(exc, LeafeError):
                # A full disk met by a write that named no path (os.write, safetensors) is the machine's
                # state, not a bug: one line too. Other OSErrors are the user's when they name a path.
                full = disk_full_error(exc, getattr(exc, "filename", None))
                if full is None and not (isinstance(exc, OSError) and exc.filename is not None):
                    raise  # a bug or the machine: keep the traceback
                exc = full or exc
            err_console.print(f"[bold red]error:[/] {escape(one_line(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


#: The resources of the command that runs now, released when it ends (return, exception or Ctrl-C).
_held: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar("leafe_held", default=None)


def hold_out(directory: Path, command: str) -> None:
    """Hold the run lock of `directory` (`leafe.lock`) until this command ends, however it ends.
    Every command that writes an --out or run directory calls it before it writes (or loads) anything;
    `command` (its words after `leafe`) goes in the lock file, for the message that refuses a second."""
    from leafe.lock import run_lock

    held = _held.get()
    if held is None:
        raise RuntimeError("hold_out is for the commands of the leafe app (LeafeGroup releases the lock)")
    held.enter_context(run_lock(directory, f"leafe {command}"))


app = typer.Typer(
    cls=LeafeGroup,
    name="leafe",
    help="Train LLM agents with LEAFE: reflect, roll back, distil. Evaluate by Pass@k.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(quiet=not is_main_process())  # one report per `leafe launch`; errors from any rank
err_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from leafe import __version__

        console.print(f"leafe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    """Train LLM agents with LEAFE: reflect, roll back, distil. Evaluate by Pass@k."""


def quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class BarProgress:
    """The method contract's progress sink (`leafe.method.Progress`) drawn as one task of a rich bar."""

    def __init__(self, bar: Progress, task: Any):
        self.bar, self.task = bar, task

    def start(self, total: int | None, done: int = 0) -> None:
        self.bar.update(self.task, total=total, completed=done)

    def advance(self, n: int = 1, status: str = "") -> None:
        self.bar.update(self.task, advance=n, **({"status": status} if status else {}))


def with_progress(description: str, job: Callable[[BarProgress], Any]) -> Any:
    """Run `job(progress)` under one progress bar."""
    with progress_bar() as bar:
        return job(BarProgress(bar, bar.add_task(description, total=None, status="")))


def passk_table(title: str, result: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("k", justify="right")
    table.add_column("Pass@k", justify="right")
    table.add_column("95% CI", justify="right")
    for k, value in result["pass_at_k"].items():
        lo, hi = result["ci95"][k]
        table.add_row(k, f"{100 * value:.1f}%", f"[{100 * lo:.1f}, {100 * hi:.1f}]")
    return table


def one_line(exc: BaseException) -> str:
    """What `main` prints for an error the user caused."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return " ".join(str(exc).split())


def main() -> None:
    # The commands register themselves on `app` when their modules are imported.
    from leafe.cli import configs, methods, run, tools  # noqa: F401

    if process_rank()[1] == 1:
        app()
        return
    try:  # a rank of `leafe launch`: its exit goes through leave_launch
        app()
        code = 0
    except SystemExit as done:
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    from leafe.methods.distributed import leave_launch

    leave_launch(code)
