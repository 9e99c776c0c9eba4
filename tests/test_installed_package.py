"""leafe as pip installs it (issue 40): the study and accelerate configs ship inside the package and are
taken by name wherever a config is (`leafe run sokoban-demo`, `leafe launch fsdp`), a file that exists
winning over a name; `leafe configs` lists them and `leafe configs cp` copies one out to edit; a config
that is neither a file nor a built-in is one line naming the built-ins.

The fast tests drive the lookup (`leafe.configs`) and the commands in this checkout. The slow one
builds the wheel offline, installs it into a fresh venv in tmp and runs that venv's `leafe` from
outside the repository: a file the wheel leaves out (package data) is missing only there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from helpers import one_line_error
from typer.testing import CliRunner

import leafe.cli.configs  # noqa: F401  (the commands register themselves)
import leafe.cli.run  # noqa: F401
import leafe.cli.tools  # noqa: F401
from leafe import configs
from leafe.cli import app
from leafe.errors import LeafeError
from leafe.study.config import load_config

ROOT = Path(__file__).resolve().parent.parent
STUDY = ["alfworld-qwen2.5-7b", "sokoban-demo", "sokoban-qwen2.5-7b"]
ACCELERATE = ["ddp", "fsdp", "zero3"]
DISTILL = ["distill", "--model", "/models/m", "--trees", "/runs/explore/trees.jsonl", "--out", "/runs/leafe"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# -- the lookup -----------------------------------------------------------------------------------
def test_the_builtins_are_named_by_their_stems_and_say_what_they_are_for():
    assert configs.names("study") == STUDY and configs.names("accelerate") == ACCELERATE
    assert len(set(configs.names())) == len(configs.names())  # `leafe configs cp NAME` needs no kind
    for config in configs.builtins():
        assert config.description and not config.description.startswith("#"), config.name
    assert configs.find("sokoban-demo").description.startswith("The CPU demo")


def test_the_repository_configs_folder_is_the_packaged_one():
    """One real location: the docs' `configs/sokoban-demo.yaml` in a clone is the file the wheel ships."""
    assert (ROOT / "configs").resolve() == (ROOT / "leafe" / "configs").resolve()
    assert (ROOT / "configs" / "accelerate" / "fsdp.yaml").resolve() == configs.find("fsdp").path


def test_a_name_means_the_builtin_and_a_file_that_exists_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo = configs.find("sokoban-demo").path
    assert configs.resolve("sokoban-demo", "study") == demo
    assert configs.resolve("sokoban-demo.yaml", "study") == demo  # no such file here: still the name
    assert configs.resolve("fsdp", "accelerate") == configs.find("fsdp").path
    Path("sokoban-demo").write_text("name: mine\nenv: sokoban\n")
    Path("sokoban-demo.yaml").write_text("name: mine\nenv: sokoban\n")
    assert configs.resolve("sokoban-demo", "study") == Path("sokoban-demo")
    assert configs.resolve("sokoban-demo.yaml", "study") == Path("sokoban-demo.yaml")
    assert load_config("sokoban-demo").name == "mine"
    Path("sokoban-demo").unlink()
    assert load_config("sokoban-demo").name == "sokoban-demo"  # the study loader takes names too
    with pytest.raises(LeafeError, match="config ./nope.yaml does not exist"):
        configs.resolve("./nope.yaml", "study")  # with a directory in it, only ever a path


def test_launch_takes_a_builtin_accelerate_config_by_name_and_prints_its_file():
    result = cli("launch", "fsdp", "--dry-run", "--num-processes", 2, "--", *DISTILL)
    assert result.exit_code == 0, result.output
    fsdp = configs.find("fsdp").path
    assert f"accelerate launch --config_file {fsdp} --num_processes 2 -m leafe {' '.join(DISTILL)}" in result.stdout


def test_a_config_that_is_neither_a_file_nor_a_builtin_is_one_line_naming_the_builtins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside a clone: no configs/ folder here
    one_line_error(cli("run", "sokoban-dmeo", "--dry-run"), "config sokoban-dmeo does not exist",
                   f"built-in study configs: {', '.join(STUDY)}", "`leafe configs` lists them")
    one_line_error(cli("run", "configs/sokoban-demo.yaml", "--dry-run"),
                   "configs/sokoban-demo.yaml does not exist", "the built-in sokoban-demo is `leafe run sokoban-demo`")
    one_line_error(cli("run", "fsdp", "--dry-run"), "fsdp is a built-in accelerate config, for `leafe launch fsdp`")
    one_line_error(cli("launch", "fdsp", "--dry-run", "--", *DISTILL), "accelerate config fdsp does not exist",
                   f"built-in accelerate configs: {', '.join(ACCELERATE)}")
    one_line_error(cli("launch", "sokoban-demo", "--dry-run", "--", *DISTILL),
                   "sokoban-demo is a built-in study config, for `leafe run sokoban-demo`")
    (tmp_path / "folder").mkdir()
    one_line_error(cli("run", "folder", "--dry-run"), "folder is a directory, not a config file")


# -- leafe configs --------------------------------------------------------------------------------
def test_configs_lists_every_builtin_with_its_description_under_the_command_that_takes_it():
    result = cli("configs")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    study, accelerate = text.split("accelerate configs (")
    assert "study configs (leafe run NAME" in study and "leafe launch NAME" in accelerate
    for config in configs.builtins():
        part = study if config.kind == "study" else accelerate
        assert f"{config.name} {config.description}" in part, config.name
    assert "leafe configs cp NAME DEST" in text


def test_configs_cp_copies_a_builtin_and_overwrites_only_when_forced(tmp_path):
    mine = tmp_path / "mine.yaml"
    result = cli("configs", "cp", "sokoban-demo", mine)
    assert result.exit_code == 0, result.output
    assert mine.read_bytes() == configs.find("sokoban-demo").path.read_bytes()  # comments and all
    assert f"leafe run {mine}" in " ".join(result.stdout.split())
    mine.write_text("name: edited\nenv: sokoban\n")
    one_line_error(cli("configs", "cp", "sokoban-demo", mine), f"{mine} exists; pass --force")
    assert load_config(mine).name == "edited"  # refused: the edit is kept
    assert cli("configs", "cp", "sokoban-demo", mine, "--force").exit_code == 0
    assert load_config(mine).name == "sokoban-demo"
    folder = tmp_path / "launch"
    folder.mkdir()
    assert cli("configs", "cp", "fsdp", folder).exit_code == 0  # DEST a directory: NAME.yaml in it
    assert (folder / "fsdp.yaml").read_bytes() == configs.find("fsdp").path.read_bytes()
    one_line_error(cli("configs", "cp", "fdsp", folder), "'fdsp' is not a built-in config", "accelerate: ddp, fsdp")


# -- the wheel, installed -------------------------------------------------------------------------
def _source_tree(dest: Path) -> Path:
    """What the wheel is built from, copied out of the checkout: the build writes build/ and
    *.egg-info beside its source, which must not land in a tree that others work in."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "leafe", dest / "leafe", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _dependencies_without_leafe(dest: Path) -> Path:
    """This venv's site-packages less leafe (its editable finder and dist-info), as links: the
    dependencies a `pip install leafe-*.whl torch==2.13.0` would install (~50 s from the registry),
    here in a second."""
    dest.mkdir()
    for site in dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib")):
        for entry in Path(site).iterdir():
            if "leafe" not in entry.name.lower() and entry.name != "__pycache__" and not (dest / entry.name).exists():
                (dest / entry.name).symlink_to(entry)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """A fresh venv in tmp with leafe installed from a wheel built offline, its dependencies those of
    this venv; returns its bin directory and a working directory outside the repository."""
    root = tmp_path_factory.mktemp("installed")
    began = time.perf_counter()
    pip = [sys.executable, "-m", "pip"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
                            str(root / "dist"), str(_source_tree(root / "src"))], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    wheel = next((root / "dist").glob("leafe-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # addsitedir, not a plain path line: the dependencies' own .pth files are processed as installed ones are
    deps = _dependencies_without_leafe(root / "deps")
    Path(site, "leafe_test_dependencies.pth").write_text(f"import site; site.addsitedir({str(deps)!r})\n")
    # pip resolves the wheel's requirements against what the new venv sees, offline: a requirement
    # nothing there meets fails here
    install = subprocess.run([*pip, "--python", str(python), "install", "--no-index", "-q", str(wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    print(f"wheel built and installed in {time.perf_counter() - began:.1f} s")
    work = root / "work"
    work.mkdir()
    return {"bin": venv / "bin", "venv": venv, "work": work}


def run_installed(installed, *args: str) -> subprocess.CompletedProcess:
    """The installed `leafe ARGS` from a directory outside the repository, with nothing of the checkout
    on its path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{installed['bin']}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "200"  # the dry-run tables keep their cells on one line
    run = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=installed["work"], env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    return run


@pytest.mark.slow
def test_the_installed_leafe_is_the_wheel_not_the_checkout(installed):
    where = run_installed(installed, "python", "-c", "import leafe, sys; print(leafe.__file__); print(sys.path)")
    file, path = where.stdout.splitlines()
    assert Path(file).is_relative_to(installed["venv"]), file
    assert str(ROOT) not in path and str(ROOT / "leafe") not in file
    assert str(installed["bin"] / "python") in (installed["bin"] / "leafe").read_text()  # the script pip wrote


@pytest.mark.slow
def test_the_installed_leafe_runs_lists_copies_and_launches_its_builtin_configs(installed):
    work = installed["work"]
    assert not (work / "configs").exists()
    plan = run_installed(installed, "leafe", "run", "sokoban-demo", "--dry-run", "--out", "demo").stdout
    assert "stage plan of sokoban-demo -> demo" in plan and "leafe.explore" in plan and "ace.eval" in plan
    assert not (work / "demo").exists()  # a dry run writes nothing

    listed = " ".join(run_installed(installed, "leafe", "configs").stdout.split())
    for name in STUDY + ACCELERATE:
        assert f" {name} " in listed, name

    copied = run_installed(installed, "leafe", "configs", "cp", "sokoban-demo", "./my.yaml")
    assert "leafe run my.yaml" in copied.stdout
    mine = work / "my.yaml"
    mine.write_text(mine.read_text().replace("name: sokoban-demo", "name: my-study"))  # the user's edit
    plan = run_installed(installed, "leafe", "run", "./my.yaml", "--dry-run").stdout
    assert "stage plan of my-study -> runs/my-study" in plan

    launch = run_installed(installed, "leafe", "launch", "fsdp", "--dry-run", "--", *DISTILL).stdout
    packaged = installed["venv"] / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    command = launch.strip().splitlines()[-1]
    assert command.startswith(f"accelerate launch --config_file {packaged}/site-packages/leafe/configs/accelerate/"
                              f"fsdp.yaml "), command
    assert command.endswith(f"-m leafe {' '.join(DISTILL)}") and "FSDP v2" in launch
