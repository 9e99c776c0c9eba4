"""The commands that run one method: eval, explore, distill, train grpo | early-experience | ace,
bootstrap. Their options come from the settings dataclasses (`leafe.cli.options`); each command holds
its --out directory's run lock (`hold_out`: one writer per directory), loads what the method needs,
calls it through the method contract, and prints its result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from leafe.cli.app import app, console, hold_out, passk_table, quiet_transformers, with_progress
from leafe.cli.options import settings_command
from leafe.errors import LeafeError
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


def _backend(model: str, settings: GenerationSettings):
    quiet_transformers()
    from leafe.backends import backend_for

    return backend_for(model, settings)


def _tracker(tracking: TrackingSettings, out: Path, stage: str):
    """The experiment trackers of one command (`--report-to`): one run, in OUT/tracking, named after
    OUT, the figures under `stage` (`leafe.tracking`); a no-op without --report-to."""
    from leafe.tracking import Tracking

    return Tracking.of(tracking.report_to, out / "tracking", out.resolve().name).open(stage)


def _reported(tracking: TrackingSettings, out: Path) -> None:
    if tracking.report_to:
        console.print(f"trackers {', '.join(tracking.report_to)} -> {out / 'tracking'}")


@app.command("eval")
@settings_command
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
    hold_out(out, "eval")
    from leafe.method import Job
    from leafe.methods.ace import load_playbook
    from leafe.methods.evaluate import evaluate
    from leafe.scale.workers import env_workers

    if playbook is not None:
        settings.playbook = load_playbook(playbook)
    _check_env(settings.env, settings.env_params)
    backend = _backend(model, generation)
    with env_workers(workers.workers, workers.ray_address) as envs:
        result = with_progress(f"eval {Path(model).name} on {settings.env}", lambda progress: evaluate(
            Job(model=model, out=out, backend=backend, envs=envs, progress=progress), settings,
            save_episodes=save_episodes))
    data = result.data
    console.print(passk_table(f"{settings.env}: {settings.tasks} tasks x {settings.samples} samples, "
                              f"T={settings.temperature}", data))
    console.print(f"env steps {result.cost['env_steps']}, generated tokens {result.cost['generated_tokens']}, "
                  f"wall {result.cost['wall_s']:.1f}s -> {out / 'eval.json'}")


@app.command("explore")
@settings_command
def explore_cmd(
    settings: ExploreSettings,
    generation: GenerationSettings,
    workers: WorkerSettings,
    tracking: TrackingSettings,
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="Output directory (trees.jsonl, summary.json); resumes a partial run.")],
) -> None:
    """LEAFE stage 1: explore tasks at a fixed env-step budget (writes OUT/trees.jsonl, OUT/summary.json)."""
    hold_out(out, "explore")
    from leafe.method import Job
    from leafe.methods.explore import explore
    from leafe.scale.workers import env_workers

    _check_env(settings.env, settings.env_params)
    backend = _backend(model, generation)
    with env_workers(workers.workers, workers.ray_address) as envs, _tracker(tracking, out, "explore") as tracker:
        result = with_progress(f"explore ({settings.strategy}, budget {settings.budget})", lambda progress: explore(
            Job(model=model, out=out, backend=backend, envs=envs, progress=progress, tracker=tracker), settings))
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


@app.command("distill")
@settings_command
def distill_cmd(
    settings: DistillSettings,
    sft: SFTSettings,
    tracking: TrackingSettings,
    model: StartOpt,
    trees: Annotated[list[Path], typer.Option("--trees", help="trees.jsonl from leafe explore (repeatable).")],
    out: Annotated[Path, typer.Option(help="Output model directory (with distill.json).")],
) -> None:
    """LEAFE stage 2: fine-tune on the corrections (D_cf) and rehearsal (D_reh) cut from exploration trees."""
    hold_out(out, "distill")
    from leafe.method import Job
    from leafe.methods.distill import distill

    quiet_transformers()
    _model_dir(model)
    with _tracker(tracking, out, "distill") as tracker:
        result = with_progress("distilling", lambda progress: distill(
            Job(model=model, out=out, inputs=[Path(t) for t in trees], progress=progress, tracker=tracker),
            settings, sft))
    summary = result.data
    cf, reh = summary["sets"]["cf"], summary["sets"]["reh"]
    console.print(
        f"D_cf {cf['rows']} rows ({cf['tokens']} tokens), D_reh {reh['rows']} rows ({reh['tokens']} tokens); "
        f"dropped over context: {cf['dropped_over_context'] + reh['dropped_over_context']}; "
        f"{summary['training']['steps']} steps, {result.cost['wall_s']:.0f}s -> {out}"
    )
    _reported(tracking, out)


train_app = typer.Typer(help="Train a baseline on the training tasks: grpo, early-experience or ace.",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")
TrainOut = Annotated[Path, typer.Option(help="Output directory: the trained model (or playbook.json) and train.json.")]


def _trained(result) -> None:
    cost = result.cost
    console.print(f"{result.method}: env steps {cost['env_steps']}, generated tokens {cost['generated_tokens']}, "
                  f"wall {cost['wall_s']:.0f}s -> {result.model} (train.json)")


@train_app.command("grpo")
@settings_command
def grpo_cmd(settings: GRPOSettings, generation: GenerationSettings, workers: WorkerSettings,
             tracking: TrackingSettings, model: StartOpt, out: TrainOut) -> None:
    """Multi-turn GRPO: G episodes per task, group-normalised advantages, clipped loss, k3 KL."""
    hold_out(out, "train grpo")
    from leafe.method import Job
    from leafe.methods.grpo import train_grpo
    from leafe.scale.workers import env_workers

    _model_dir(model)
    _check_env(settings.env, settings.env_params)
    quiet_transformers()
    with env_workers(workers.workers, workers.ray_address) as envs, _tracker(tracking, out, "grpo") as tracker:
        result = with_progress("grpo", lambda progress: train_grpo(
            Job(model=model, out=out, envs=envs, progress=progress, device=generation.device, tracker=tracker),
            settings, generation))
    _trained(result)
    _reported(tracking, out)


@train_app.command("early-experience")
@settings_command
def early_experience_cmd(settings: EarlyExperienceSettings, sft: SFTSettings, generation: GenerationSettings,
                         workers: WorkerSettings, tracking: TrackingSettings, model: StartOpt, out: TrainOut) -> None:
    """Early Experience: implicit world modelling (iwm) or self-reflection (sr) on the expert's states."""
    hold_out(out, "train early-experience")
    from leafe.method import Job
    from leafe.methods.early_experience import train_early_experience
    from leafe.scale.workers import env_workers

    _model_dir(model)
    _check_env(settings.env, settings.env_params)
    backend = _backend(model, generation)
    with (env_workers(workers.workers, workers.ray_address) as envs,
          _tracker(tracking, out, "early_experience") as tracker):
        result = with_progress(f"early experience ({settings.variant})", lambda progress: train_early_experience(
            Job(model=model, out=out, backend=backend, envs=envs, progress=progress, release=backend.close,
                tracker=tracker),
            settings, sft))  # the engine closes before the model to train loads (Job.done_sampling)
    _trained(result)
    _reported(tracking, out)


@train_app.command("ace")
@settings_command
def ace_cmd(settings: ACESettings, generation: GenerationSettings, workers: WorkerSettings,
            tracking: TrackingSettings, model: StartOpt, out: TrainOut) -> None:
    """ACE: a playbook of lessons curated from the policy's own play (writes OUT/playbook.json)."""
    hold_out(out, "train ace")
    from leafe.method import Job
    from leafe.methods.ace import train_ace
    from leafe.scale.workers import env_workers

    _model_dir(model)
    _check_env(settings.env, settings.env_params)
    backend = _backend(model, generation)
    with env_workers(workers.workers, workers.ray_address) as envs, _tracker(tracking, out, "ace") as tracker:
        result = with_progress("ace rounds", lambda progress: train_ace(
            Job(model=model, out=out, backend=backend, envs=envs, progress=progress, tracker=tracker), settings))
    _trained(result)
    _reported(tracking, out)


@app.command("bootstrap")
@settings_command
def bootstrap_cmd(
    config: BootstrapConfig,
    out: Annotated[Path, typer.Option(help="Where to write the model directory.")],
    force: Annotated[bool, typer.Option(help="Overwrite OUT even if it is not a leafe model directory.")] = False,
) -> None:
    """Build the embedded base agent: a small Llama pretrained on synthetic Sokoban play."""
    hold_out(out, "bootstrap")
    from leafe.base_agent.bootstrap import bootstrap, check_output_dir
    from leafe.method import Job

    quiet_transformers()
    check_output_dir(out, force)
    result = with_progress("bootstrap", lambda progress: bootstrap(Job(model="", out=out, progress=progress), config))
    summary = result.data
    console.print(
        f"base agent: {summary['parameters'] / 1e6:.2f}M parameters, {summary['data']['fragments']} fragments and "
        f"{summary['data']['episodes']} episodes, {result.cost['wall_s']:.0f}s -> {out}"
    )
