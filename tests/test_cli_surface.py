"""The command line as a whole: options come from the settings dataclasses with their defaults, the
light commands load no torch, and the errors a user can cause end in one line and exit status 2."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import click
import pytest
import typer.main
from helpers import leafe

from leafe.cli import app
from leafe.cli.options import cli_fields, default_of, parse_env_params, parse_ks


def _commands(group: click.Group, prefix: str = ""):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer's own click, not an instance of click.Group)
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def _cli():
    import leafe.cli.methods  # noqa: F401  (the commands register themselves)
    import leafe.cli.run  # noqa: F401
    import leafe.cli.tools  # noqa: F401

    return typer.main.get_command(app)


def test_every_settings_option_defaults_to_its_field_and_has_help():
    generated = 0
    for name, command in _commands(_cli()):
        classes = getattr(command.callback, "settings_classes", {})
        params = {p.name: p for p in command.params}
        for cls in classes.values():
            for field in cli_fields(cls):
                option = params[field.name]
                default = option.default
                if field.name == "env_params":
                    default = parse_env_params(list(default))
                elif field.name == "ks":
                    default = parse_ks(default)
                assert default == default_of(field), f"leafe {name} --{field.name}: {default!r} != {default_of(field)!r}"
                assert field.metadata["help"], f"{cls.__name__}.{field.name} has no help text"
                generated += 1
    assert generated > 80  # every method command is generated, not only a few


def test_train_is_one_subcommand_per_baseline_and_each_knob_means_one_thing():
    train = _cli().commands["train"]
    assert sorted(train.commands) == ["ace", "early-experience", "grpo"]
    epochs = {name: next(p for p in cmd.params if p.name == "epochs").default for name, cmd in train.commands.items()
              if any(p.name == "epochs" for p in cmd.params)}
    assert epochs == {"ace": 1, "early-experience": 2.0}  # ACE's passes vs the SFT's epochs
    assert type(epochs["ace"]) is int and type(epochs["early-experience"]) is float


def test_a_training_knob_is_one_option_with_one_help_in_every_training_command():
    commands = dict(_commands(_cli()))
    trainers = ["distill", "train grpo", "train early-experience"]
    for knob in ("learning_rate", "weight_decay", "max_grad_norm", "activation_checkpointing", "lora", "lora_r",
                 "lora_alpha"):
        options = {name: next(p for p in commands[name].params if p.name == knob) for name in trainers}
        assert len({(tuple(o.opts), o.default, o.help) for o in options.values()}) == 1, knob


def test_the_settings_modules_import_no_torch():
    for module in ("leafe.settings", "leafe.study.config", "leafe.method"):
        code = f"import sys, {module}; assert 'torch' not in sys.modules, {module!r}"
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0, module


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"], ["envs"],
                                  ["run", "sokoban-demo", "--dry-run"]])
def test_help_and_dry_run_load_no_torch(argv, tmp_path):
    code = ("import sys; sys.argv = ['leafe', *sys.argv[1:]]\nfrom leafe.cli import main\ntry:\n    main()\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    argv = [*argv, "--out", str(tmp_path / "run")] if argv[0] == "run" else argv
    run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                         cwd=str(__import__("pathlib").Path(__file__).parent.parent))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("no torch")


def _one_line_error(run, *needles: str) -> None:
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), run.stderr
    assert "Traceback" not in run.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_corrupt_trees_file_is_one_line(tiny_model_dir, tmp_path):
    trees = tmp_path / "trees.jsonl"
    trees.write_text('{"task_id": "a", "nodes": [}\n{"task_id": "b"}\n')
    _one_line_error(leafe("distill", "--model", tiny_model_dir, "--trees", trees, "--out", tmp_path / "o"),
                    "trees.jsonl:1 is not valid JSON")
    trees.write_text(json.dumps({"task_id": "a", "success": True}) + "\n")  # JSON, but not a tree
    _one_line_error(leafe("distill", "--model", tiny_model_dir, "--trees", trees, "--out", tmp_path / "o"),
                    "is not a tree written by leafe explore")


def test_a_corrupt_model_file_is_one_line(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file" * 8)
    run = leafe("eval", "--model", broken, "--out", tmp_path / "e", "--tasks", 1, "--samples", 1)
    _one_line_error(run, str(broken / "model.safetensors"), "is not a safetensors file")


def test_an_out_that_is_a_file_is_one_line(tiny_model_dir, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file, not a directory")
    run = leafe("eval", "--model", tiny_model_dir, "--out", taken, "--tasks", 1, "--samples", 1)
    _one_line_error(run, str(taken), "exists")


def test_dry_run_checks_the_env_its_parameters_and_paths(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: t\nenv: sokobam\n")
    _one_line_error(leafe("run", config, "--dry-run"), "unknown env 'sokobam'")
    config.write_text("name: t\nenv_params: {max_stepz: 3}\n")
    _one_line_error(leafe("run", config, "--dry-run"), "has no parameter 'max_stepz'")
    config.write_text(f"name: t\nenv_params: {{levels: {tmp_path / 'none.xsb'}}}\n")
    _one_line_error(leafe("run", config, "--dry-run"), "none.xsb does not exist")
    config.write_text(f"name: t\nmodel: {tmp_path / 'no-model'}\n")
    _one_line_error(leafe("run", config, "--dry-run"), "no-model does not exist")
    assert not (tmp_path / "runs").exists()


def test_settings_dataclasses_are_the_only_defaults_the_study_config_uses():
    from leafe.settings import ACESettings, EarlyExperienceSettings, GRPOSettings, SFTSettings
    from leafe.study.config import StudyConfig

    config = StudyConfig(name="t")
    assert config.distill_sft() == SFTSettings()
    # the training tasks and Early Experience's variant, unset, are the settings classes' own
    assert config.grpo_settings() == GRPOSettings() and config.ace_settings() == ACESettings()
    assert config.early_experience_settings() == EarlyExperienceSettings()
    assert dataclasses.asdict(config.eval_settings())["max_batch"] == 64


def test_the_final_table_fits_80_columns_and_keeps_the_method_names():
    from rich.console import Console

    from leafe.cli.run import results_table

    ks = ["1", "2", "4", "8", "16", "32", "64", "128"]
    vs = {k: {"diff": -0.1234, "ci95": [-0.3, 0.05]} for k in ("1", "128")}
    methods = {name: {"pass_at_k": {k: 0.4 for k in ks}, **({"vs_base": vs} if name != "base" else {})}
               for name in ("base", "grpo", "leafe", "early_experience", "ace")}
    results = {"env": "sokoban", "tasks": 100, "samples": 128, "methods": methods}
    for width in (80, 200):
        console = Console(width=width, record=True, color_system=None)
        console.print(results_table(results, width=width))
        lines = console.export_text().splitlines()
        assert max(map(len, lines)) <= width
        assert any("Early Experience" in line for line in lines)  # a name is never wrapped
        header = next(line for line in lines if "Pass@1 " in line)
        assert "Pass@128" in header and ("Pass@8 " in header) == (width == 200)  # middle ks go first


def test_a_log_gets_a_line_with_progress_and_eta_while_a_stage_runs():
    from rich.progress import Progress

    from leafe.cli.run import LogProgress

    bar, lines, now = Progress(), [], [0.0]
    sink = LogProgress(bar, bar.add_task("eval", total=None, status=""), "base.eval", lambda: now[0], lines.append,
                       every_s=60)
    sink.start(10)
    for second in (10, 20, 70, 80, 140):
        now[0] = second
        sink.advance(1, status="solved 1/1")
    # One line a minute of the stage's clock, not one per advance; each says where it is and what is left.
    assert lines == ["[0:01:10]   base.eval: 3/10, solved 1/1, ETA 0:02:43",  # 70 s for 3, 7 to go
                     "[0:02:20]   base.eval: 5/10, solved 1/1, ETA 0:02:20"]
