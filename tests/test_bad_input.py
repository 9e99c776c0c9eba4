"""Every file leafe reads, broken, through every command: one line on stderr that names the file and
what is wrong with it, exit status 2, no traceback.

The faults are those a user meets: a file that is not text (a binary or a file of another encoding),
one cut short (a copy or a write that was interrupted), and one of the wrong shape (JSON of another
type, a record missing a key). Each case runs the real command line in this process (typer's
CliRunner), so an exception that escapes `LeafeGroup` shows up as a traceback here as it would for a
user. The commands fail before they load a model, or load the tiny one of conftest.py.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

import leafe.cli.methods  # noqa: F401  (the commands register themselves)
import leafe.cli.run  # noqa: F401
import leafe.cli.tools  # noqa: F401
from leafe.cli import app
from leafe.envs.code.datasets import PACKAGE_DATA

SHARED_DATA = Path(os.environ.get("LEAFE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
#: Not UTF-8 (0xff never is), with a newline in it so that line-based readers see more than one line.
BINARY = b"\x89PNG\r\n\x1a\n\x00\xff\xfe\xfd binary \x80\x81\n\x00\x01 more\n"


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _cut(text: str) -> str:
    """The first half of `text`: a file whose copy or write was cut short."""
    return text[: len(text) // 2]


def _jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# -- faults: each writes a broken file of its kind and returns it --------------------------------
JSON_FAULTS: dict[str, Callable[[Path, dict], Path]] = {
    "binary": lambda path, good: _write(path, BINARY),
    "truncated": lambda path, good: _write(path, _cut(json.dumps(good))),
    "list": lambda path, good: _write(path, json.dumps([good])),
    "empty": lambda path, good: _write(path, ""),
}
#: JSONL faults: each gets the good records and the key a record cannot do without.
JSONL_FAULTS: dict[str, Callable[[Path, list[dict], str], Path]] = {
    "binary": lambda path, good, key: _write(path, BINARY),
    "truncated-line": lambda path, good, key: _write(path, _cut(json.dumps(good[0])) + "\n" + _jsonl(*good[1:])),
    "list-record": lambda path, good, key: _write(path, _jsonl(list(good[0].values()), *good[1:])),
    "missing-key": lambda path, good, key: _write(path, _jsonl({k: v for k, v in good[0].items() if k != key},
                                                               *good[1:])),
}


def _tree(task_id: str = "t-0") -> dict:
    return {"task_id": task_id, "success": False, "branches": 0, "branches_succeeded": 0, "nodes": []}


def _results() -> dict:
    return {"name": "s", "env": "sokoban", "tasks": 1, "samples": 1, "model": "m",
            "methods": {"base": {"pass_at_k": {"1": 0.0}, "ci95": {"1": [0.0, 0.0]}}}}


# -- commands: each builds its arguments around one broken file ----------------------------------
def _eval(model: Path, out: Path, *extra) -> list:
    return ["eval", "--model", model, "--out", out, "--tasks", 1, "--samples", 1, "--max-new-tokens", 4, *extra]


#: command -> {file it reads: the faults tried on it}
JSON4 = ("binary", "truncated", "list", "empty")
JSON3 = ("binary", "truncated", "list")
CASES: dict[str, dict[str, tuple[str, ...]]] = {
    "run": {"config": JSON4, "model config.json": JSON3, "stage.json": JSON3},
    "eval": {"playbook": (*JSON4, "missing key"), "eval_tasks.jsonl": tuple(JSONL_FAULTS),
             "model dir": ("not a model",), "model config.json": JSON3, "model weights": ("truncated",),
             "tokenizer": ("truncated", "binary"), "gguf": ("binary",),
             "mbpp.jsonl": tuple(JSONL_FAULTS), "apps.jsonl": tuple(JSONL_FAULTS),
             "code problems.jsonl": tuple(JSONL_FAULTS), "code problems.jsonl.gz": ("truncated",),
             "code problems.parquet": ("truncated",), "webshop items": (*JSON3, "record-list"),
             "webshop attributes": (*JSON3, "record-list"), "alfworld game": JSON3,
             "textworld game": ("binary", "truncated"), "sokoban levels": ("binary",)},
    "explore": {"settings.json": JSON3, "trees.jsonl": tuple(JSONL_FAULTS)},
    "distill": {"trees.jsonl": tuple(JSONL_FAULTS), "model dir": ("not a model",), "model config.json": ("binary",)},
    "train grpo": {"train.json": (*JSON3, "missing key"), "log.jsonl": ("binary", "list-record"), "model dir": ("not a model",),
                   "model weights": ("truncated",)},
    "train early-experience": {"model dir": ("not a model",), "tokenizer": ("truncated",)},
    "train ace": {"playbook.json": JSON4, "model dir": ("not a model",)},
    "bootstrap": {"bootstrap.json": JSON4},
    "judge": {"problem": (*JSON4, "tests not a list")},
    "show-tree": {"trees.jsonl": tuple(JSONL_FAULTS)},
    "report": {"results.json": (*JSON4, "missing key"), "trees.jsonl": tuple(JSONL_FAULTS)},
}


def _broken_model(model: Path, tmp: Path, file: str, fault: str) -> tuple[Path, Path]:
    """A copy of the tiny model with one file broken: (model dir, the broken file)."""
    broken = tmp / "model"
    if fault == "not a model":
        _write(broken / "README.md", "notes, not a model")
        return broken, broken
    shutil.copytree(model, broken)
    if file == "model weights":
        path = broken / "model.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return broken, path
    if file == "tokenizer":
        path = broken / "tokenizer.json"
        _write(path, BINARY if fault == "binary" else _cut(path.read_text()))
        return broken, path
    path = broken / "config.json"
    JSON_FAULTS[fault](path, json.loads(path.read_text()))
    return broken, path


def _code_rows(file: str) -> tuple[list[dict], dict, str]:
    """A few real rows of a code data set, the env params that read them from a copy, and the key a
    row of it cannot do without."""
    if file == "mbpp.jsonl":
        source, params, key = SHARED_DATA / "mbpp" / "mbpp.jsonl", {"dataset": "mbpp"}, "test_list"
    elif file == "apps.jsonl":
        source, params, key = SHARED_DATA / "apps" / "selected150.jsonl", {"dataset": "apps"}, "description"
    else:
        source, params, key = PACKAGE_DATA / "code_problems.jsonl", {}, "id"
    if not source.is_file():
        pytest.skip(f"{source} is not here (set LEAFE_SHARED_DATA)")
    with open(source) as f:
        rows = [json.loads(next(f)) for _ in range(3)]
    return rows, params, key


def run_case(file: str, fault: str, tmp: Path, model: Path) -> tuple[list, Path]:
    config, out = tmp / "study.yaml", tmp / "out"
    argv = ["run", config, "--dry-run", "--out", out]
    if file == "config":
        _write(config, {"binary": BINARY, "truncated": "name: t\nenv_params: {max_steps: [3,\n",
                        "list": "- name: t\n- env: sokoban\n", "empty": ""}[fault])
        return argv, config
    if file == "model config.json":
        broken, path = _broken_model(model, tmp, file, fault)
        _write(config, f"name: t\nmodel: {broken}\n")
        return argv, path
    _write(config, f"name: t\nmodel: {model}\n")  # a run directory whose stage record is broken
    return argv, JSON_FAULTS[fault](out / "base" / "eval" / "stage.json", {"digest": "x", "done": True})


def eval_case(file: str, fault: str, tmp: Path, model: Path) -> tuple[list, Path]:
    out = tmp / "out"
    if file == "playbook":
        path = tmp / "playbook.json"
        if fault == "missing key":
            _write(path, json.dumps({"lessons": [{"helpful": 3}]}))  # a lesson without its text
        else:
            JSON_FAULTS[fault](path, {"next_id": 2, "lessons": [{"id": "ctx-00001", "text": "push boxes from behind"}]})
        return _eval(model, out, "--playbook", path), path
    if file == "eval_tasks.jsonl":  # a partial evaluation to resume
        records = [{"settings": {}}, {"task_id": "sokoban-0", "n": 1}]
        return _eval(model, out), JSONL_FAULTS[fault](out / "eval_tasks.jsonl", records, "settings")
    if file == "gguf":
        path = _write(tmp / "model.gguf", BINARY)
        return _eval(path, out), path
    if file.startswith("model") or file == "tokenizer":
        broken, path = _broken_model(model, tmp, file, fault)
        return _eval(broken, out), path
    if file.endswith((".gz", ".parquet")):  # a compressed copy of the shipped problems, cut short
        rows, _, _ = _code_rows(file)
        path = tmp / "data" / file.replace(" ", "_")
        if file.endswith(".gz"):
            _write(path, gzip.compress(_jsonl(*rows).encode()))
        else:
            pyarrow, parquet = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
            path.parent.mkdir(parents=True)
            parquet.write_table(pyarrow.Table.from_pylist(rows), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return _eval(model, out, "--env", "code", "--task-seed", 0, "--env-param", f"dataset={path}"), path
    if file.endswith(".jsonl"):
        rows, params, key = _code_rows(file)
        name = {"mbpp.jsonl": "mbpp.jsonl", "apps.jsonl": "selected150.jsonl"}.get(file, "code_problems.jsonl")
        path = JSONL_FAULTS[fault](tmp / "data" / name, rows, key)
        params = {**params, "data_dir": path} if params else {"dataset": path}
        return _eval(model, out, "--env", "code", "--task-seed", 0,
                     *(x for k, v in params.items() for x in ("--env-param", f"{k}={v}"))), path
    if file.startswith("webshop"):
        data, path = _webshop_data(file, fault, tmp)
        return _eval(model, out, "--env", "webshop", "--env-param", f"data_dir={data}"), path
    if file == "alfworld game":
        source = SHARED_DATA / "alfworld" / "json_2.1.1" / "valid_seen"
        if not source.is_dir():
            pytest.skip(f"ALFWorld's games are not at {source}")
        game = sorted(source.glob("*/*/game.tw-pddl"))[0]
        copy = tmp / "alfworld" / "json_2.1.1" / "valid_seen" / game.relative_to(source)
        path = JSON_FAULTS[fault](copy, json.loads(game.read_text()))
        return _eval(model, out, "--env", "alfworld", "--env-param", f"data_dir={tmp / 'alfworld'}"), path
    if file == "textworld game":
        # Jericho ends the process on such a file. The header of a Z-machine v8 story 400 kB long stands
        # for a real game cut short (a real one takes seconds to make).
        header = bytes([8]) + bytes(0x19) + (50_000).to_bytes(2, "big") + bytes(36)
        path = _write(tmp / "games" / "game.z8", BINARY if fault == "binary" else header + bytes(1000))
        return _eval(model, out, "--env", "textworld", "--env-param", f"games={path.parent}", "--task-seed", 0), path
    path = _write(tmp / "levels.xsb", BINARY)  # sokoban levels
    return _eval(model, out, "--env-param", f"levels={path}"), path


def _webshop_data(file: str, fault: str, tmp: Path) -> tuple[Path, Path]:
    """A folder with WebShop's two item files for five real products, one of them broken."""
    source = SHARED_DATA / "webshop"
    if not (source / "items_shuffle_1000.json").is_file():
        pytest.skip(f"WebShop's data is not at {source}")
    data = tmp / "webshop"
    products = json.loads((source / "items_shuffle_1000.json").read_text())[:5]
    infos = json.loads((source / "items_ins_v2_1000.json").read_text())
    infos = {p["asin"]: infos[p["asin"]] for p in products if p["asin"] in infos}
    _write(data / "items_shuffle_1000.json", json.dumps(products))
    _write(data / "items_ins_v2_1000.json", json.dumps(infos))
    items = file == "webshop items"
    path = data / ("items_shuffle_1000.json" if items else "items_ins_v2_1000.json")
    if fault == "binary":
        _write(path, BINARY)
    elif fault == "truncated":
        _write(path, _cut(json.dumps(products if items else infos)))
    elif fault == "list":  # each file given the other's shape
        _write(path, json.dumps(infos if items else products))
    elif items:  # a product that is a list of pairs, not an object
        _write(path, json.dumps([list(products[0].items())]))
    else:  # attributes that are lists, not objects
        _write(path, json.dumps({asin: list(info.values()) for asin, info in infos.items()}))
    return data, path


def explore_case(file: str, fault: str, tmp: Path, model: Path) -> tuple[list, Path]:
    out = tmp / "out"  # a partial exploration to resume
    argv = ["explore", "--model", model, "--out", out, "--tasks", 1, "--budget", 2, "--max-new-tokens", 4]
    if file == "settings.json":
        return argv, JSON_FAULTS[fault](out / "settings.json", {"env": "sokoban"})
    return argv, JSONL_FAULTS[fault](out / "trees.jsonl", [_tree("sokoban-0"), _tree("sokoban-1")], "task_id")


def distill_case(file: str, fault: str, tmp: Path, model: Path) -> tuple[list, Path]:
    trees, out = tmp / "trees.jsonl", tmp / "out"
    if file == "trees.jsonl":
        path = JSONL_FAULTS[fault](trees, [_tree("a"), _tree("b")], "nodes")
        return ["distill", "--model", model, "--trees", path, "--out", out], path
    _write(trees, _jsonl(_tree("a")))
    broken, path = _broken_model(model, tmp, file, fault)
    return ["distill", "--model", broken, "--trees", trees, "--out", out], path


def train_case(method: str) -> Callable[[str, str, Path, Path], tuple[list, Path]]:
    def case(file: str, fault: str, tmp: Path, model: Path) -> tuple[list, Path]:
        out = tmp / "out"
        argv = ["train", method, "--env", "sokoban", "--tasks", 1, "--out", out,
                *(["--tasks-per-step", 1, "--steps", 1, "--group-size", 2, "--max-new-tokens", 4]
                  if method == "grpo" else [])]
        if file == "playbook.json":
            return [*argv, "--model", model], JSON_FAULTS[fault](
                out / "playbook.json", {"settings": {}, "round": 0, "rounds": [], "lessons": []})
        if file == "train.json":
            if fault == "missing key":
                return [*argv, "--model", model], _write(out / "train.json", json.dumps({"final": {}}))
            return [*argv, "--model", model], JSON_FAULTS[fault](out / "train.json", {"settings": {}})
        if file == "log.jsonl":  # read on resuming, once the model has loaded
            return [*argv, "--model", model], JSONL_FAULTS[fault](out / "log.jsonl", [{"step": 0}, {"step": 1}], "step")
        broken, path = _broken_model(model, tmp, file, fault)
        return [*argv, "--model", broken], path

    return case


def bootstrap_case(file: str, fault: str, tmp: Path, model: Path) -> tuple[list, Path]:
    out = tmp / "out"  # a base agent built earlier, whose record is broken
    return ["bootstrap", "--out", out], JSON_FAULTS[fault](out / "bootstrap.json", {"config_hash": "x"})


def judge_case(file: str, fault: str, tmp: Path, model: Path) -> tuple[list, Path]:
    solution, problem = _write(tmp / "solution.py", "print(input())\n"), tmp / "problem.json"
    if fault == "tests not a list":
        _write(problem, json.dumps({"public_tests": {"input": "1\n", "output": "1\n"}}))
    else:
        JSON_FAULTS[fault](problem, {"public_tests": [{"input": "1\n", "output": "1\n"}], "private_tests": []})
    return ["judge", "--problem", problem, "--solution", solution, "--unsafe-no-sandbox"], problem


def show_tree_case(file: str, fault: str, tmp: Path, model: Path) -> tuple[list, Path]:
    path = JSONL_FAULTS[fault](tmp / "trees.jsonl", [_tree("a"), _tree("b")], "nodes")
    return ["show-tree", path], path


def report_case(file: str, fault: str, tmp: Path, model: Path) -> tuple[list, Path]:
    run = tmp / "run"
    if file == "trees.jsonl":
        _write(run / "results.json", json.dumps(_results()))
        return ["report", run], JSONL_FAULTS[fault](run / "leafe" / "explore" / "trees.jsonl",
                                                    [_tree("a"), _tree("b")], "nodes")
    if fault == "missing key":
        results = {k: v for k, v in _results().items() if k != "methods"}
        return ["report", run], _write(run / "results.json", json.dumps(results))
    return ["report", run], JSON_FAULTS[fault](run / "results.json", _results())


BUILD = {"run": run_case, "eval": eval_case, "explore": explore_case, "distill": distill_case,
         "train grpo": train_case("grpo"), "train early-experience": train_case("early-experience"),
         "train ace": train_case("ace"), "bootstrap": bootstrap_case, "judge": judge_case,
         "show-tree": show_tree_case, "report": report_case}


runner = CliRunner()


@pytest.mark.parametrize(("command", "file", "fault"), [
    pytest.param(command, file, fault, id="-".join(x.replace(" ", "_") for x in (command, file, fault)))
    for command, files in CASES.items() for file, faults in files.items() for fault in faults])
def test_a_broken_file_is_one_line_naming_it(command, file, fault, tmp_path, tiny_model_dir):
    argv, path = BUILD[command](file, fault, tmp_path, tiny_model_dir)
    result = runner.invoke(app, [str(a) for a in argv])
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"traceback: {type(result.exception).__name__}: {result.exception}")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.stdout[-2000:], result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert str(path) in lines[0], lines[0]


@pytest.mark.parametrize("content", [BINARY.replace(b"\n", b" "), b'{"task_id": "a", "nodes": [}\n{"task_id": "b"'],
                         ids=["binary-without-newline", "bad-line-then-torn-line"])
def test_a_file_that_is_not_jsonl_is_left_as_it_was(content, tmp_path):
    """A JSONL reader cuts a torn last line off leafe's own files (a killed writer); given the wrong
    file, it must not cut that one."""
    path = _write(tmp_path / "trees.jsonl", content)
    result = runner.invoke(app, ["show-tree", str(path)])
    assert result.exit_code == 2 and str(path) in result.stderr, result.stderr
    assert path.read_bytes() == content
