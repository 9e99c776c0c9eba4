"""The commands that run one method: eval, explore, distill, train grpo | early-experience | ace,
bootstrap, and one for any method registered without a command of its own (`add_command`).

The method registry (`leafe.methods.registry`) names each command and says what its method needs;
`run_method` is the one scaffold they share: it holds the --out directory's run lock (`hold_out`: one
writer per directory), checks the starting checkpoint and the env before any model loads, starts what
the method needs (a sampling engine, env workers, the trackers of --report-to) and calls it through
the method contract under a progress bar. A command's options come from the settings dataclasses
(`leafe.cli.options`); what is its own is its other options, its help and how it prints its result.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from leafe.cli.app import app, console, hold_out, passk_table, quiet_transformers, with_progress
from leafe.cli.options import settings_command
from leafe.errors import LeafeError
from leafe.method import MethodResult
from leafe.methods import registry
from leafe.methods.registry import Method
from leafe.settings import (
    ACESettings,
    BootstrapConfig,
    DistillSettings,
    EarlyExperienceSettings,
    EvalSettings,
    ExploreSettings,
    GenerationSettings,
    GRPOSettings,
    SFTSettings,
    TrackingSettings,
    WorkerSettings,
)

ModelOpt = Annotated[str, typer.Option("--model", help="Model directory (or .gguf file with --backend hf).")]
StartOpt = Annotated[str, typer.Option("--model", help="Starting checkpoint (a model directory).")]

train_app = typer.Typer(help="Train a baseline on the training tasks: grpo, early-experience or ace.",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")
TrainOut = Annotated[Path, typer.Option(help="Output directory: the trained model (or playbook.json) and train.json.")]
#: The groups a registry command's first words name (`train grpo` is `grpo` of `train_app`).
GROUPS = {(): app, ("train",): train_app}
_commands: set[str] = set()  # the registry commands registered so far


def method_command(name: str) -> Callable[[Callable], Callable]:
    """Register a command function as the `leafe` command of registry method `name`, its settings
    parameters made options (`settings_command`)."""
    words = registry.get(name).command.split()

    def register(fn: Callable) -> Callable:
        _commands.add(" ".join(words))
        return GROUPS[tuple(words[:-1])].command(words[-1])(settings_command(fn))

    return register


def _check_env(env: str, params: dict) -> None:
    """Fail on a bad env name or parameter before any model loads."""
    from leafe.envs import make

    make(env, **params)


def _model_dir(model: str) -> None:
    """Fail on a starting checkpoint that cannot load (not a model directory, a broken file of one)
    before any env or model work starts."""
    if not Path(model).is_dir():
        raise LeafeError(f"--model {model} is not a model directory")
    from leafe.backends.hf import resolve_model_path

    resolve_model_path(model)


def _tracker(tracking: TrackingSettings, out: Path, stage: str):
    """The experiment trackers of one command (`--report-to`): one run, in OUT/tracking, named after
    OUT, the figures under `stage` (`leafe.tracking`); a no-op without --report-to."""
    from leafe.tracking import Tracking

    return Tracking.of(tracking.report_to, out / "tracking", out.resolve().name).open(stage)


def _reported(tracking: TrackingSettings, out: Path) -> None:
    if tracking.report_to:
        console.print(f"trackers {', '.join(tracking.report_to)} -> {out / 'tracking'}")


def run_method(name: str, model: str, out: Path, *settings: Any, label: str,
               generation: GenerationSettings | None = None, workers: WorkerSettings | None = None,
               tracking: TrackingSettings | None = None, inputs: list[Path] | None = None,
               before: Callable[[], None] | None = None, **options: Any) -> MethodResult:
    """Run registry method `name` from `model` into `out` with its `settings` (in its order), as its
    entry says (see the module's text); `before` runs once OUT is held (a check of the command's
    own), `options` go to the method's call. Returns its result."""
    method = registry.get(name)
    hold_out(out, method.command)
    if before is not None:
        before()
    if "checkpoint" in method.needs:
        _model_dir(model)
    if "envs" in method.needs:
        _check_env(settings[0].env, settings[0].env_params)
    quiet_transformers()
    backend = None
    if "engine" in method.needs:
        from leafe.backends import backend_for

        backend = backend_for(model, generation)
    function = method.load()
    from leafe.method import Job
    from leafe.scale.workers import env_workers

    job: dict[str, Any] = {"model": model, "out": out, "backend": backend, "inputs": list(inputs or [])}
    if "generation" in method.needs:  # the method starts its own engine: its model goes where that one does
        job["device"], options["generation"] = generation.device, generation
    if backend is not None and method.trains:  # the engine closes before the model to train loads (Job.done_sampling)
        job["release"] = backend.close
    envs = env_workers(workers.workers, workers.ray_address) if "envs" in method.needs else contextlib.nullcontext()
    trackers = _tracker(tracking, out, method.name) if tracking is not None else contextlib.nullcontext()
    with envs as made, trackers as tracker:
        job |= {"envs": made} if made is not None else {}
        job |= {"tracker": tracker} if tracker is not None else {}
        return with_progress(label, lambda progress: function(Job(**job, progress=progress), *settings, **options))


@method_command("eval")
def eval_cmd(
    settings: EvalSettings,
    generation: GenerationSettings,
    workers: WorkerSettings,
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="Output directory (eval.json); resumes if it holds a partial run.")],
    save_episodes: Annotated[bool, typer.Option(help="Also write every episode to episodes.jsonl.")] = False,
    playbook: Annotated[Path | None, typer.Option(help="ACE playbook.json: its lessons go in the system prompt.")] = None,
) -> None:
    """Run n independent episodes per task and report Pass@k (writes OUT/eval.json)."""

    def read_playbook() -> None:
        if playbook is not None:
            from leafe.methods.ace import load_playbook

            settings.playbook = load_playbook(playbook)

    result = run_method("eval", model, out, settings, label=f"eval {Path(model).name} on {settings.env}",
                        generation=generation, workers=workers, before=read_playbook, save_episodes=save_episodes)
    console.print(passk_table(f"{settings.env}: {settings.tasks} tasks x {settings.samples} samples, "
                              f"T={settings.temperature}", result.data))
    console.print(f"env steps {result.cost['env_steps']}, generated tokens {result.cost['generated_tokens']}, "
                  f"wall {result.cost['wall_s']:.1f}s -> {out / 'eval.json'}")


@method_command("explore")
def explore_cmd(
    settings: ExploreSettings,
    generation: GenerationSettings,
    workers: WorkerSettings,
    tracking: TrackingSettings,
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="Output directory (trees.jsonl, summary.json); resumes a partial run.")],
) -> None:
    """LEAFE stage 1: explore tasks at a fixed env-step budget (writes OUT/trees.jsonl, OUT/summary.json)."""
    result = run_method("explore", model, out, settings, generation=generation, workers=workers, tracking=tracking,
                        label=f"explore ({settings.strategy}, budget {settings.budget})")
    summary = result.data
    table = Table(title=f"{settings.strategy} on {settings.env}: {summary['tasks']} tasks, "
                        f"budget {settings.budget} env steps each")
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
    _reported(tracking, out)
    if summary["replay_divergences"]:
        typer.echo(f"warning: {summary['replay_divergences']} branches refused: replaying their prefix did not "
                   f"reproduce the recorded observations, so {settings.env} is not deterministic under reset + "
                   f"replay (replay_divergences in summary.json); give the env snapshot()/restore() or a reset "
                   f"that the task's seed fixes", err=True)


@method_command("distill")
def distill_cmd(
    settings: DistillSettings,
    sft: SFTSettings,
    tracking: TrackingSettings,
    model: StartOpt,
    trees: Annotated[list[Path], typer.Option("--trees", help="trees.jsonl from leafe explore (repeatable).")],
    out: Annotated[Path, typer.Option(help="Output model directory (with distill.json).")],
) -> None:
    """LEAFE stage 2: fine-tune on the corrections (D_cf) and rehearsal (D_reh) cut from exploration trees."""
    result = run_method("distill", model, out, settings, sft, label="distilling", tracking=tracking,
                        inputs=[Path(t) for t in trees])
    summary = result.data
    cf, reh = summary["sets"]["cf"], summary["sets"]["reh"]
    console.print(
        f"D_cf {cf['rows']} rows ({cf['tokens']} tokens), D_reh {reh['rows']} rows ({reh['tokens']} tokens); "
        f"dropped over context: {cf['dropped_over_context'] + reh['dropped_over_context']}; "
        f"{summary['training']['steps']} steps, {result.cost['wall_s']:.0f}s -> {out}"
    )
    _reported(tracking, out)


def _trained(result) -> None:
    cost = result.cost
    console.print(f"{result.method}: env steps {cost['env_steps']}, generated tokens {cost['generated_tokens']}, "
                  f"wall {cost['wall_s']:.0f}s -> {result.model} (train.json)")


@method_command("grpo")
def grpo_cmd(settings: GRPOSettings, generation: GenerationSettings, workers: WorkerSettings,
             tracking: TrackingSettings, model: StartOpt, out: TrainOut) -> None:
    """Multi-turn GRPO: G episodes per task, group-normalised advantages, clipped loss, k3 KL."""
    _trained(run_method("grpo", model, out, settings, label="grpo", generation=generation, workers=workers,
                        tracking=tracking))
    _reported(tracking, out)


@method_command("early_experience")
def early_experience_cmd(settings: EarlyExperienceSettings, sft: SFTSettings, generation: GenerationSettings,
                         workers: WorkerSettings, tracking: TrackingSettings, model: StartOpt, out: TrainOut) -> None:
    """Early Experience: implicit world modelling (iwm) or self-reflection (sr) on the expert's states."""
    _trained(run_method("early_experience", model, out, settings, sft, label=f"early experience ({settings.variant})",
                        generation=generation, workers=workers, tracking=tracking))
    _reported(tracking, out)


@method_command("ace")
def ace_cmd(settings: ACESettings, generation: GenerationSettings, workers: WorkerSettings,
            tracking: TrackingSettings, model: StartOpt, out: TrainOut) -> None:
    """ACE: a playbook of lessons curated from the policy's own play (writes OUT/playbook.json)."""
    _trained(run_method("ace", model, out, settings, label="ace rounds", generation=generation, workers=workers,
                        tracking=tracking))
    _reported(tracking, out)


@method_command("bootstrap")
def bootstrap_cmd(
    config: BootstrapConfig,
    out: Annotated[Path, typer.Option(help="Where to write the model directory.")],
    force: Annotated[bool, typer.Option(help="Overwrite OUT even if it is not a leafe model directory.")] = False,
) -> None:
    """Build the embedded base agent: a small Llama pretrained on synthetic Sokoban play."""

    def check_out() -> None:
        from leafe.base_agent.bootstrap import check_output_dir

        check_output_dir(out, force)

    result = run_method("bootstrap", "", out, config, label="bootstrap", before=check_out)
    summary = result.data
    console.print(
        f"base agent: {summary['parameters'] / 1e6:.2f}M parameters, {summary['data']['fragments']} fragments and "
        f"{summary['data']['episodes']} episodes, {result.cost['wall_s']:.0f}s -> {out}"
    )


def add_command(method: Method) -> None:
    """The `leafe` command of a registered method that has none written for it (its entry's
    `command`): one option per field of its settings, the engine's and the env workers' where it
    samples and plays envs, --report-to, --model and --out; it prints what the method cost."""
    words = method.command.split()
    if method.command in _commands or tuple(words[:-1]) not in GROUPS:
        raise LeafeError(f"cannot add `leafe {method.command}`: the command is taken, or its group is not "
                         f"`leafe` or `leafe train`")
    extra = {"generation": GenerationSettings} if method.samples else {}
    extra |= {"workers": WorkerSettings} if "envs" in method.needs else {}
    classes = {**method.settings, **extra, "tracking": TrackingSettings}
    model = ({"model": StartOpt if "checkpoint" in method.needs else ModelOpt}
             if method.needs & {"model", "checkpoint"} else {})
    out = Annotated[Path, typer.Option(help="Output directory; a rerun resumes what it holds.")]
    annotations = {**classes, **model, "out": out}

    def command(**values: Any) -> None:
        tracking = values["tracking"]
        result = run_method(method.name, values.get("model", ""), values["out"],
                            *(values[name] for name in method.settings), label=method.name, tracking=tracking,
                            generation=values.get("generation"), workers=values.get("workers"))
        console.print(f"{result.method}: env steps {result.cost['env_steps']}, generated tokens "
                      f"{result.cost['generated_tokens']}, wall {result.cost['wall_s']:.0f}s -> {result.model}")
        _reported(tracking, values["out"])

    command.__name__ = f"{method.name}_cmd"
    command.__doc__ = f"Run the registered method {method.name} ({method.module}.{method.function})."
    command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind) for name, kind in annotations.items()])
    command.__annotations__ = annotations
    _commands.add(method.command)
    GROUPS[tuple(words[:-1])].command(words[-1])(settings_command(command))


for _method in registry.methods():  # every registered method has a command: its own above, else a generated one
    if _method.command is not None and _method.command not in _commands:
        add_command(_method)
