"""`leafe configs`: list the configs that ship with leafe; `leafe configs cp NAME DEST`: copy one out to
edit (as torchtune's `tune ls` / `tune cp`). The lookup itself is `leafe.configs`."""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path
from typing import Annotated

import typer

from leafe import configs
from leafe.cli.app import app, console
from leafe.errors import LeafeError
from leafe.files import write_bytes

configs_app = typer.Typer(help="List the configs that ship with leafe, each with what it is for; "
                                "`leafe configs cp NAME DEST` copies one out to edit.")
app.add_typer(configs_app, name="configs")

#: What each kind's heading says about using one.
_USE = {"study": "leafe run NAME [--dry-run]", "accelerate": "leafe launch NAME [--dry-run] -- COMMAND ..."}


@configs_app.callback(invoke_without_command=True)
def configs_cmd(ctx: typer.Context) -> None:
    """List the built-in configs, each with what it is for; `leafe configs cp NAME DEST` copies one out."""
    if ctx.invoked_subcommand is None:
        sys.stdout.write(configs_listing(max(40, min(shutil.get_terminal_size((80, 24)).columns, 120))))


def configs_listing(width: int = 80) -> str:
    """Per kind, a heading that says how to use one, then each config's name and description (its
    first comment line), wrapped to `width` columns under the description's column."""
    out: list[str] = []
    column = max(len(name) for name in configs.names()) + 4
    for kind in configs.KINDS:
        out.append(f"{kind} configs ({_USE[kind]}):")
        for config in configs.builtins(kind):
            out.extend(textwrap.wrap(config.description, width, initial_indent=f"  {config.name:<{column - 2}}",
                                     subsequent_indent=" " * column, break_on_hyphens=False)
                       or [f"  {config.name}"])
        out.append("")
    out.append("Copy one to edit: leafe configs cp NAME DEST (then run or launch DEST).")
    return "\n".join(out) + "\n"


@configs_app.command("cp")
def cp_cmd(
    name: Annotated[str, typer.Argument(help="A built-in config (`leafe configs` lists them).")],
    dest: Annotated[Path, typer.Argument(help="The file to write, or a directory to write NAME.yaml into.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite DEST if it exists.")] = False,
) -> None:
    """Copy a built-in config to DEST, to edit and pass to `leafe run` / `leafe launch` as a path."""
    config = configs.get(name)
    target = dest / config.path.name if dest.is_dir() else dest
    if target.exists() and not force:
        raise LeafeError(f"{target} exists; pass --force to overwrite it")
    write_bytes(target, config.path.read_bytes())  # a copy as shipped, its comments included
    use = _USE[config.kind].replace("NAME", str(target))
    console.print(f"{config.name} -> {target}; edit it, then: {use}", markup=False, highlight=False, soft_wrap=True)
