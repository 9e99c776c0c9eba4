"""Envs from outside leafe (issue 40): a package names its Env subclass in an entry point of group
`leafe.envs`, and `leafe envs`, `--env` and the Ray workers of `--workers` find it; a broken plugin is
one line and hides no other env; built-ins win a name clash, which is said; `check_env` holds an env
to the contract of leafe.envs.base.

The packages are written here, into temporary folders put on PYTHONPATH: a package and the
`*.dist-info` folder (METADATA, entry_points.txt) that pip would install beside it, which is all
importlib.metadata reads. `numberline` is a complete small plugin: walk from 0 to a target with +1
and -1, no snapshots (rollback replays), an oracle reflector (so a random tiny model still branches).
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import leafe, squashed

from leafe.envs import EnvError, check_params, make, names, registry
from leafe.envs.base import Env
from leafe.envs.contract import ContractError, check_env

NUMBERLINE = '''"""A number line: walk from 0 to a target number with +1 and -1 steps (a leafe env plugin).

Deterministic (a task is its target; the state is the position and the step count) and without
snapshots, so leafe rolls it back by replay; its oracle reflection names the step after which the
target was out of reach."""

from __future__ import annotations

import random

from leafe.envs import Env, StepResult, Task

MOVES = {"+1": 1, "-1": -1}


class NumberLineEnv(Env):
    name = "numberline"
    has_oracle_reflection = True

    def __init__(self, max_steps: int = 8, span: int = 3):
        """`max_steps`: moves before the episode ends unsolved. `span`: the farthest a target is from 0."""
        self.max_steps, self.span = max_steps, span
        self._target = self._position = self._steps = 0
        self._done = True

    def make_tasks(self, n, seed):
        tasks = []
        for s in range(seed, seed + n):
            rng = random.Random(s)
            target = rng.choice([-1, 1]) * rng.randint(1, self.span)
            tasks.append(Task(f"numberline-{s}", self.name, {"target": target}))
        return tasks

    def reset(self, task):
        self._target, self._position, self._steps, self._done = task.spec["target"], 0, 0, False
        self.instruction = f"Walk from 0 to {self._target}. Each turn, answer with the action +1 or -1."
        return "You are at 0."

    def step(self, action):
        if self._done:
            raise RuntimeError("step() after the episode ended; call reset() first")
        self._steps += 1
        move = MOVES.get(action.strip())
        self._position += move or 0
        text = f"You are at {self._position}."
        if move is None:
            text = f"{action.strip()[:40]!r} is not an action (+1 or -1). " + text
        success = self._position == self._target
        self._done = success or self._steps >= self.max_steps
        return StepResult(text, float(success), self._done, success, {"invalid": move is None})

    def expert_actions(self, task):
        target = task.spec["target"]
        return ["+1" if target > 0 else "-1"] * abs(target)

    def oracle_reflection(self, task, actions):
        position, target = 0, task.spec["target"]
        for t, action in enumerate(actions):
            position += MOVES.get(action.strip(), 0)
            if abs(target - position) > self.max_steps - (t + 1):
                step = "+1" if target > position else "-1"
                return f"Step: {t}\\nExperience: at step {t} the target went out of reach; answer {step}."
        return "Step: none\\nExperience: the target is still within reach."
'''

BROKEN_ROW = ("brokenline: broken plugin shaky_missing:Env (from shaky 0.1): ModuleNotFoundError: "
              "No module named 'shaky_missing'; fix or uninstall that package")


def write_dist(root: Path, dist: str, entry_points: dict[str, str], files: dict[str, str] | None = None) -> Path:
    """What `pip install` leaves in site-packages: the files, and DIST-0.1.dist-info with the entry points."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[leafe.envs]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for path, text in (files or {}).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


@pytest.fixture(scope="module")
def plugins(tmp_path_factory) -> SimpleNamespace:
    """`good`: the numberline package. `bad`: one package whose entry points are all wrong in some way."""
    root = tmp_path_factory.mktemp("plugins")
    good = write_dist(root / "good", "numberline", {"numberline": "numberline:NumberLineEnv"},
                      {"numberline/__init__.py": NUMBERLINE})
    bad = write_dist(root / "bad", "shaky", {
        "brokenline": "shaky_missing:Env",  # its module does not exist
        "notanenv": "numberline:MOVES",  # not an Env subclass
        "sokoban": "numberline:NumberLineEnv",  # a built-in's name
        "walker": "numberline:NumberLineEnv",  # a class that calls itself numberline
    })
    return SimpleNamespace(good=good, bad=bad)


def plugins_on(*folders: Path) -> dict[str, str]:
    """The environment of a `leafe` process that finds the plugins in `folders`, as if installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, folders))}


@pytest.fixture
def on_path(monkeypatch):
    """Put plugin folders on this process's sys.path (as an installed package is) for one test."""

    def put(*folders: Path) -> None:
        for folder in folders:
            monkeypatch.syspath_prepend(str(folder))
        registry.forget_plugins()

    yield put
    registry.forget_plugins()
    sys.modules.pop("numberline", None)


# -- discovery and `leafe envs` -------------------------------------------------------------------

def test_leafe_envs_lists_a_plugin_env_with_its_parameters_beside_the_builtins(plugins):
    result = leafe("envs", env=plugins_on(plugins.good))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert "numberline: A number line: walk from 0 to a target number with +1 and -1 steps" in lines
    assert "    max_steps=8: moves before the episode ends unsolved." in lines
    assert "  data found: nothing needed" in lines
    listed = [line.split(":")[0] for line in lines if line and not line.startswith(" ")]
    assert listed == sorted({"numberline", "sokoban", "code", "webshop", *listed})


def test_listing_names_imports_no_plugin(plugins):
    code = "import sys; from leafe.envs import names; print('numberline' in names(), 'numberline' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(plugins.good)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.split() == ["True", "False"], done.stderr


def test_a_broken_plugin_is_one_row_of_leafe_envs_and_every_other_env_still_lists(plugins):
    result = leafe("envs", env=plugins_on(plugins.good, plugins.bad))
    assert result.returncode == 0, result.stderr
    rows = [block for block in result.stdout.split("\n\n") if block.strip()]  # one block per env, in name order
    by_name = {row.split(":")[0]: row for row in rows}
    assert list(by_name) == sorted(by_name) and len(by_name) == len(rows)
    assert {"brokenline", "notanenv", "numberline", "walker", "sokoban", "code", "scienceworld", "textworld",
            "alfworld", "webshop"} <= set(by_name)
    assert " ".join(by_name["brokenline"].split()) == BROKEN_ROW  # wrapped to 80 columns like every row
    assert " ".join(by_name["notanenv"].split()).startswith(
        "notanenv: broken plugin numberline:MOVES (from shaky 0.1): TypeError: numberline:MOVES is "
        "{'+1': 1, '-1': -1}, not a subclass of leafe.envs.Env")
    assert "max_steps=8: moves before the episode ends unsolved." in by_name["numberline"]
    # Built-ins win a clash, and the listing says so; a misnamed class is said too.
    assert squashed("note: plugin sokoban = numberline:NumberLineEnv (from shaky 0.1) is ignored: a built-in env has "
                    "this name") in squashed(by_name["sokoban"])
    assert "span=3" not in by_name["sokoban"] and "dim=[6,6]" in by_name["sokoban"]
    assert squashed("its class names itself 'numberline', but its entry point makes it env 'walker'") in \
        squashed(by_name["walker"])


def test_env_of_a_broken_plugin_fails_in_one_line_naming_the_plugin_and_its_error(plugins, tmp_path):
    result = leafe("explore", "--env", "brokenline", "--model", tmp_path / "model", "--out", tmp_path / "out",
                   env=plugins_on(plugins.bad))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: env 'brokenline' is a " + BROKEN_ROW.removeprefix("brokenline: ")]


def test_a_broken_plugin_is_the_error_of_its_env_and_clashes_are_warned_once(plugins, on_path, caplog):
    on_path(plugins.good, plugins.bad)
    assert {"numberline", "walker", "brokenline", "notanenv", "sokoban"} <= set(names())
    with pytest.raises(EnvError) as broken:
        check_params("brokenline", {})  # what a dry run meets
    assert str(broken.value) == "env 'brokenline' is a " + BROKEN_ROW.removeprefix("brokenline: ")
    assert registry.env_class("sokoban").__module__ == "leafe.envs.sokoban.env"
    with caplog.at_level(logging.WARNING, logger="leafe.envs.registry"):
        assert type(make("walker")).__name__ == "NumberLineEnv"
        for _ in range(2):  # warned once per process
            make("sokoban")
            make("walker")
    assert [r.getMessage() for r in caplog.records] == [
        "warning: plugin walker = numberline:NumberLineEnv (from shaky 0.1): its class names itself 'numberline', "
        "but its entry point makes it env 'walker'; set `name = 'walker'` on the class",
        "warning: plugin sokoban = numberline:NumberLineEnv (from shaky 0.1) is ignored: a built-in env has this "
        "name; rename its entry point"]
    with pytest.raises(TypeError, match="env name 'sokoban' of .* is taken by leafe.envs.sokoban.env.SokobanEnv"):
        registry.register(type("Impostor", (registry.env_class("numberline"),), {"name": "sokoban"}))


# -- a plugin env in the stages -------------------------------------------------------------------

def test_explore_branches_on_a_plugin_env_rolling_back_by_replay(plugins, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = leafe("explore", "--env", "numberline", "--model", tiny_model_dir, "--tasks", 2, "--task-seed", 0,
                   "--budget", 12, "--max-new-tokens", 4, "--reflector", "oracle", "--out", out,
                   env=plugins_on(plugins.good), timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"] == 2 and summary["branches"] > 0 and summary["replayed_steps"] > 0
    trees = [json.loads(line) for line in (out / "trees.jsonl").read_text().splitlines()]
    assert sorted(t["task_id"] for t in trees) == ["numberline-0", "numberline-1"]


@pytest.mark.slow
def test_a_plugin_env_resolves_in_the_ray_workers_and_keeps_the_contract_there(plugins):
    pytest.importorskip("ray")
    code = ("from leafe.envs.contract import check_env\nfrom leafe.scale.workers import EnvPool\n"
            "pool = EnvPool(1)\ntry:\n"
            "    print(check_env(lambda: pool.make('numberline'), tasks=2, actions=['+1', '-1']))\n"
            "finally:\n    pool.close()\n")
    env = {**os.environ, "PYTHONPATH": str(plugins.good)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ContractReport(env='numberline', tasks=2, episodes=4" in done.stdout and "replays=4" in done.stdout


# -- check_env --------------------------------------------------------------------------------------

def test_check_env_passes_sokoban_with_rollback_by_snapshot_and_replay():
    report = check_env(lambda: make("sokoban"), tasks=3)
    assert report.episodes == report.ended == report.successes == 3  # the solver's moves win each level
    assert report.replays == report.restores == 3


def test_the_docs_template_test_passes_on_the_plugin_env(plugins, on_path):
    on_path(plugins.good)
    # The template of docs/environments.md, "Write your own env".
    report = check_env(lambda: make("numberline"), actions=["+1", "-1"])
    assert report.ended > 0 and report.replays > 0
    assert report.episodes == 6 and report.restores == 0  # an expert and a random episode per task; no snapshots


def test_the_example_env_of_the_docs_keeps_the_contract(tmp_path):
    docs = (Path(__file__).resolve().parents[1] / "docs" / "environments.md").read_text()
    example = docs.split("## Write your own env", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(example, str(tmp_path / "numberline.py"), "exec"), namespace)  # noqa: S102 (our own docs)
    report = check_env(namespace["NumberLineEnv"], actions=["+1", "-1"])
    assert report.episodes == 6 and report.ended == 6 and report.replays == 6


def breaches(base: type[Env]) -> dict[str, tuple[type[Env], str]]:
    """Envs that break the contract one way each, and what check_env says of it."""

    class NoisyReset(base):
        def reset(self, task):
            return super().reset(task) + f" ({random.random():.3f})"

    class RandomTasks(base):
        def make_tasks(self, n, seed):
            return [replace(t, spec={"target": random.choice([-2, 2])}) for t in super().make_tasks(n, seed)]

    class StepsAfterTheEnd(base):
        def step(self, action):
            self._done = False
            return super().step(action)

    class NoInstruction(base):
        def reset(self, task):
            observation = super().reset(task)
            self.instruction = ""
            return observation

    class SnapshotSharesTheState(base):
        supports_snapshot = True

        def snapshot(self):
            return self.__dict__  # the live state, not a copy: it moves on with the episode

        def restore(self, state):
            self.__dict__.update(state)

    return {
        "noisy reset": (NoisyReset, "The env is not deterministic under reset+replay"),
        "random tasks": (RandomTasks, "differs from one call (or env) to the next"),
        "steps after the end": (StepsAfterTheEnd, "ended was accepted; refuse it"),
        "no instruction": (NoInstruction, "left env.instruction empty"),
        "snapshot shares the state": (SnapshotSharesTheState, "after restore(snapshot()) to step"),
    }


@pytest.mark.parametrize("breach", ["noisy reset", "random tasks", "steps after the end", "no instruction",
                                    "snapshot shares the state"])
def test_check_env_names_the_breach(plugins, on_path, breach):
    on_path(plugins.good)
    from numberline import NumberLineEnv

    cls, message = breaches(NumberLineEnv)[breach]
    with pytest.raises(ContractError) as caught:
        check_env(cls, actions=["+1", "-1"])
    assert message in str(caught.value)
