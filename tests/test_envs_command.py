"""`leafe envs`: every env with its parameters and whether its data is found; the line that says where
to get missing data is the very error of making the env without it (`Env.data_status`).

The found cases read WebShop's and ALFWorld's real files in ../shared/data (set LEAFE_SHARED_DATA to
move it); nothing here builds an env that has its data, so the file runs in a few seconds.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
from helpers import squashed
from typer.testing import CliRunner

import leafe.cli.tools  # noqa: F401  (registers `leafe envs` on the app)
from leafe.cli import app
from leafe.cli.tools import envs_listing
from leafe.envs import Env, EnvError, check_params, make, names, registry

SHARED = Path(os.environ.get("LEAFE_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
DATA_VARIABLES = ("WEBSHOP_DATA", "ALFWORLD_DATA", "MBPP_DATA", "APPS_DATA", "CODECONTESTS_DATA")


def needs_shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the real data sets live in ../shared/data (set LEAFE_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True)
def no_data_variables(monkeypatch, tmp_path):
    """No data reachable through the environment, and ALFWorld's default folder empty, unless a test
    sets them."""
    for variable in DATA_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def envs(*args: str):
    return CliRunner().invoke(app, ["envs", *args])


def test_every_env_is_listed_with_its_parameters_defaults_and_help_within_80_columns():
    text = envs_listing(None, {}, width=80)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    assert [line.split(":")[0] for line in lines if line and not line.startswith(" ")] == names()
    for name in names():
        for param in registry.parameters(name):
            assert param.name in text
    # Defaults as --env-param writes them, and the help of the constructor's docstring.
    assert "    max_steps=15: moves before the episode ends unsolved." in lines
    assert "    dim=[6,6]: (rows, columns) of a generated level." in lines
    assert "  data found: generated from seeds, nothing needed" in lines


def test_the_command_works_when_stdout_is_not_a_terminal_and_wraps_instead_of_truncating():
    result = envs()  # CliRunner's stdout is a pipe, not a terminal
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 80
    assert "unsafe_no_sandbox=false: run without bubblewrap." in result.output
    assert "webshop: The WebShop env" in result.output
    assert result.output == envs_listing(None, {}, width=80)


@pytest.mark.parametrize("name, params", [
    ("webshop", {}),
    ("webshop", {"data_dir": "/nowhere/webshop"}),
    ("alfworld", {"data_dir": "/nowhere/alfworld"}),
    ("alfworld", {}),
    ("code", {"dataset": "mbpp"}),
    ("code", {"dataset": "apps", "data_dir": "/nowhere/apps"}),
    ("sokoban", {"levels": "/nowhere/pack.xsb"}),
])
def test_the_missing_data_line_of_the_listing_is_the_error_of_the_dry_run_and_of_making_the_env(name, params):
    status = registry.data_status(name, params)
    assert not status.found and "\n" not in status.fix
    assert squashed(f"MISSING: {status.fix}") in squashed(envs_listing([name], params, width=80))
    with pytest.raises(EnvError) as dry_run:
        check_params(name, params)
    assert str(dry_run.value) == status.fix
    if name == "alfworld":
        pytest.importorskip("alfworld")  # the install check comes first
    with pytest.raises(EnvError) as made:
        make(name, **params)
    assert str(made.value) == status.fix


def test_the_missing_lines_say_where_to_get_the_data():
    assert "`alfworld-download`" in registry.data_status("alfworld").fix
    assert "$ALFWORLD_DATA" in registry.data_status("alfworld").fix
    webshop = registry.data_status("webshop").fix
    assert "items_shuffle_1000.json + items_ins_v2_1000.json" in webshop and "$WEBSHOP_DATA" in webshop
    assert "items_shuffle.json + items_ins_v2.json" in registry.data_status("webshop", {"products": "all"}).fix
    for dataset, variable in (("mbpp", "MBPP_DATA"), ("apps", "APPS_DATA"), ("codecontests", "CODECONTESTS_DATA")):
        fix = registry.data_status("code", {"dataset": dataset}).fix
        assert "data_dir=PATH" in fix and variable in fix


def test_webshop_data_is_found_in_the_shared_folder_and_missing_in_an_empty_one(tmp_path):
    data = needs_shared("webshop")
    result = envs("webshop", "--env-param", f"data_dir={data}")
    assert result.exit_code == 0, result.output
    assert squashed(f"data found: {data}") in squashed(result.output)
    assert squashed("given: data_dir=") in squashed(result.output)
    result = envs("webshop", "--env-param", f"data_dir={tmp_path}")
    assert result.exit_code == 0, result.output
    assert squashed(f"data MISSING: {tmp_path} has no items_shuffle_1000.json, items_ins_v2_1000.json: get") in \
        squashed(result.output)


def test_alfworld_games_are_found_in_the_shared_folder_per_split_and_missing_elsewhere(tmp_path, monkeypatch):
    data = needs_shared("alfworld", "json_2.1.1")
    for split in ("valid_seen", "valid_unseen", "train"):
        status = registry.data_status("alfworld", {"data_dir": str(data.parent), "split": split})
        assert status.found and status.where == str(data / split)
    monkeypatch.setenv("ALFWORLD_DATA", str(data.parent))  # the variable is read when data_dir is not given
    assert registry.data_status("alfworld").found
    result = envs("alfworld", "--env-param", f"data_dir={data.parent}")
    assert result.exit_code == 0 and squashed(f"data found: {data / 'valid_seen'}") in squashed(result.output)
    result = envs("alfworld", "--env-param", f"data_dir={tmp_path / 'none'}")
    missing = f"data MISSING: no ALFWorld games (game.tw-pddl) under {tmp_path / 'none' / 'json_2.1.1'}"
    assert squashed(missing) in squashed(result.output)


def test_the_code_env_reports_each_dataset_unless_one_is_given(monkeypatch):
    text = squashed(envs_listing(["code"], {}, width=80))
    assert squashed("dataset=leafe: found:") in text and squashed("(built in)") in text
    assert squashed("dataset=mbpp: MISSING: dataset=mbpp needs its data") in text
    mbpp = needs_shared("mbpp")
    monkeypatch.setenv("MBPP_DATA", str(mbpp))
    text = squashed(envs_listing(["code"], {}, width=80))
    assert squashed(f"dataset=mbpp: found: {mbpp / 'mbpp.jsonl'}") in text
    apps = needs_shared("apps")
    text = squashed(envs_listing(["code"], {"dataset": "apps", "data_dir": str(apps)}, width=80))
    assert squashed(f"data found: {apps / 'selected150.jsonl'}") in text and "dataset=mbpp" not in text


def test_an_env_param_no_listed_env_takes_is_a_one_line_error():
    result = envs("sokoban", "--env-param", "data_dir=/x")
    assert result.exit_code == 2
    assert squashed("no env among sokoban takes --env-param data_dir") in squashed(result.output)
    assert envs("sokobam").exit_code == 2


def test_data_status_takes_the_constructors_defaults():
    for name in names():
        cls = registry.env_class(name)
        if cls.data_status.__func__ is Env.data_status.__func__:
            continue
        init = inspect.signature(cls.__init__).parameters
        for param in inspect.signature(cls.data_status).parameters.values():
            if param.kind is inspect.Parameter.KEYWORD_ONLY or param.default is not inspect.Parameter.empty:
                assert param.name in init and init[param.name].default == param.default, (name, param.name)
