"""The method registry: one entry per method drives the public API, a study's config and stages, the
runner, the launcher and the CLI. Adding a method is one module plus one entry, as
docs/architecture.md shows: its two code blocks run here as they stand."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

import leafe
from leafe.errors import LeafeError
from leafe.method import NoProgress
from leafe.methods import registry
from leafe.scale.stage import launched
from leafe.study.config import StudyConfig, load_config
from leafe.study.runner import StageRunner
from leafe.study.study import Study

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def doc_blocks() -> tuple[str, str]:
    """The toy method's module and its registration, from the architecture page's "Adding a method"."""
    section = DOC.read_text().split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    module, registration = re.findall(r"```python\n(.*?)```", section, re.S)
    return module, registration


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The documented toy method, written as a module and registered in this process (taken out after)."""
    module, registration = doc_blocks()
    (tmp_path / "toy_method.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    exec(compile(registration, f"{DOC}: Adding a method", "exec"), {})
    yield registry.get("toy")
    registry.unregister("toy")
    sys.modules.pop("toy_method", None)


def test_the_registry_is_where_every_list_of_methods_comes_from():
    names = [c.name for c in registry.compared()]
    assert names == ["base", "grpo", "leafe", "early_experience", "ace"] == StudyConfig(name="s").methods
    leafe_stages = next(c for c in registry.compared() if c.name == "leafe").stages
    assert [m.name for m in leafe_stages] == ["explore", "distill"]
    assert [registry.label(n) for n in names] == ["Base", "GRPO", "LEAFE", "Early Experience", "ACE"]
    assert launched() == ["grpo", "distill", "sft"]  # what the launcher runs over training.processes
    assert {m.name for m in registry.methods() if m.samples} == {"eval", "grpo", "explore", "early_experience", "ace"}
    assert {m.name for m in registry.methods() if m.trains} == {"grpo", "distill", "early_experience", "bootstrap"}
    for method in registry.methods():  # the public API: every method's function, from its module
        assert method.function in leafe.__all__ and method.function in dir(leafe)
    # Importing the registry (and leafe) loads no method: it names modules, it does not import them.
    code = "import sys, leafe, leafe.methods.registry; assert 'torch' not in sys.modules and 'leafe.methods.grpo' " \
           "not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_an_entry_that_clashes_or_needs_what_no_job_carries_is_refused():
    grpo = registry.get("grpo")
    with pytest.raises(LeafeError, match="registered already"):
        registry.register(grpo)
    with pytest.raises(LeafeError, match="its function or its stage is grpo's"):
        registry.register(registry.Method("grpo2", "train_grpo2", "m", {}, study="grpo"))
    with pytest.raises(LeafeError, match="needs \\['gpu'\\] unknown"):
        registry.Method("x", "x", "m", {}, frozenset({"gpu"}))
    with pytest.raises(LeafeError, match="built-in"):
        registry.unregister("ace")
    with pytest.raises(LeafeError, match="no method named 'ppo'; known: eval, grpo"):
        registry.get("ppo")


def test_a_toy_method_is_one_module_and_one_entry_and_a_study_plans_runs_and_lists_it(toy, tmp_path):
    import toy_method

    assert leafe.train_toy is toy_method.train_toy and "train_toy" in dir(leafe)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"name": "toy", "methods": ["base", "toy"], "toy": {"rounds": 5}}))
    study = Study(load_config(config), tmp_path / "run")
    stages = {s.key: s for s in study.stages()}
    assert list(stages) == ["bootstrap", "base.eval", "toy.train", "toy.eval"]
    trained = stages["toy.train"]
    assert (trained.title, trained.method, trained.after) == ("Toy countdown from base", "toy", ("bootstrap",))
    assert trained.fingerprint == {"settings": {"toy": {"rounds": 5}, "start": "base"},
                                   "after": {"bootstrap": stages["bootstrap"].digest()}}
    assert stages["toy.eval"].after == ("toy.train",)
    assert study.model_of("toy") == study.base_model()  # it trains nothing: its model is the one it started from

    # The dry run lists it (the stage table of `leafe run --dry-run`), with its own directory.
    from leafe.cli.run import stage_table

    console = Console(width=200, record=True)
    console.print(stage_table(study, list(stages.values())))
    assert re.search(r"toy\.train .*Toy countdown from base .*todo .*run/toy/train", console.export_text())

    # The runner calls it as the registry says and records it; the stage is then done, and a changed
    # setting makes it stale (its fingerprint holds its settings).
    StageRunner(study).run_stage(trained, "todo", NoProgress())
    record = json.loads((tmp_path / "run" / "toy" / "train" / "stage.json").read_text())
    assert record["done"] and record["method"] == "toy" and record["data"] == {"rounds": 5}
    assert json.loads((tmp_path / "run" / "toy" / "train" / "toy.json").read_text()) == {"rounds": 5}
    assert study.status(trained) == "done"
    changed = Study(load_config(config, ["toy.rounds=6"]), tmp_path / "run")
    assert changed.status(next(s for s in changed.stages() if s.key == "toy.train")) == "stale"

    # Its section is checked like any other: a key its settings do not have is one line naming it.
    with pytest.raises(LeafeError, match="toy.rouns is not a setting; known: rounds"):
        load_config(config, ["toy.rouns=5"])
    with pytest.raises(LeafeError, match="colour: Extra inputs are not permitted"):
        load_config(config, ["colour=blue"])


def test_a_registered_method_gets_its_command_generated(tmp_path):
    # A command is generated for a method registered before the CLI is built (a fresh process here).
    module, registration = doc_blocks()
    (tmp_path / "toy_method.py").write_text(module)
    script = (f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\n{registration}\n"
              "from typer.testing import CliRunner\nfrom leafe.cli import app\nimport leafe.cli.methods\n"
              "runner = CliRunner()\n"
              "for args in (['train', '--help'], ['train', 'toy', '--help'], sys.argv[1:]):\n"
              "    result = runner.invoke(app, args)\n"
              "    print(result.output, result.exit_code)\n")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", script, "train", "toy", "--rounds", "2", "--out", str(out)],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert run.returncode == 0, run.stderr
    assert re.search(r"│ toy\b", run.stdout) and "--rounds" in run.stdout and "Rounds to count down." in run.stdout
    assert "toy: env steps 0, generated tokens 0, wall 0s -> " in run.stdout
    assert json.loads((out / "toy.json").read_text()) == {"rounds": 2}


def test_a_registered_methods_other_settings_are_a_mapping_of_their_own_in_its_section(toy, tmp_path):
    from toy_method import ToySettings

    from leafe.settings import SFTSettings

    registry.register(registry.Method("toy_sft", "train_toy_sft", "toy_method", {"settings": ToySettings,
                                      "sft": SFTSettings}, trains=True, study="toys", label="Toy SFT"))
    try:
        config = StudyConfig.model_validate({"name": "t", "methods": ["base", "toys"], "model": str(tmp_path),
                                             "toys": {"rounds": 2, "start": "base", "sft": {"epochs": 3}}})
        settings = config.settings_of(registry.get("toy_sft"))
        assert (settings["settings"].rounds, settings["sft"].epochs) == (2, 3)
        stage = next(s for s in Study(config, tmp_path / "run").stages() if s.key == "toys.train")
        # it trains: the model, and how many processes train it
        assert set(stage.fingerprint["settings"]) == {"toy_sft", "sft", "model", "gguf_file", "dtype", "training",
                                                      "start"}
        with pytest.raises(LeafeError, match="toys.sft.epochz is not a setting"):
            StudyConfig.model_validate({"name": "t", "toys": {"sft": {"epochz": 3}}}).settings_of(registry.get("toy_sft"))
    finally:
        registry.unregister("toy_sft")
