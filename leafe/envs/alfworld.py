"""ALFWorld: household tasks as text games (the paper's embodied setting), played offline from files.

Wraps ALFWorld's text engine: a `game.tw-pddl` file (JSON with the `alfred.pddl` domain, the
`alfred.twl2` grammar with the task goal filled in, the PDDL problem of one ALFRED scene, and the
expert walkthrough) is played by textworld's `PddlEnv` (state kept by fast-downward) under ALFWorld's
`AlfredDemangler`, which turns ids like `Fridge_bar__plus_01_dot_50...` into "fridge 1", exactly as
ALFWorld's `AlfredTWEnv` does for evaluation (no domain randomization). Games are read from
`$ALFWORLD_DATA/json_2.1.1/<split>/**/game.tw-pddl`, sorted; task i is game i. It is not the
THOR (visual) version, and it does not download data: `alfworld-download` does that.

The first observation is the room description; the goal ("Your task is to: ...") ends
`env.instruction`. Commands are ALFWorld's ("go to fridge 1", "take apple 1 from countertop 1",
"move apple 1 to fridge 1", ...); anything else is an ordinary step answered "Nothing happens.".
Success is the game's `won` flag (reward 1).

Rollback replays: `PddlEnv.copy()` is not implemented, and the game state lives inside the C library
of fast-downward (one private copy per env) with no supported way to save and restore it, so the
framework resets and re-plays the prefix (`base.replay`), which is deterministic here.

Resets are cheap because what textworld rebuilds from the game file is cached. It builds the game
state from fast-downward's PDDL-to-SAS translation of the problem, twice (plain, and optimised for
the planner), on every load and again on every reset, and parses the game's grammar on every load:
most of the time before an episode's first step (the rollout engine makes a new env for every
episode), and of every replay's reset. Both depend only on the file's text, so `cached` answers them
from memory, else from a pickle on disk under `leafe.files.cache_dir("alfworld")` keyed by the
SHA-256 of that text (written atomically, so processes and Ray workers share it); what a reset still
pays is textworld's first observation and command list, which a step pays too
(benchmarks/alfworld_speed.py times both ways: BENCHMARKS.md, "ALFWorld on its real games").
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leafe.envs.base import DataStatus, Env, EnvError, StepResult, Task
from leafe.envs.registry import register
from leafe.files import cache_dir, expect, read_json, write_bytes

SPLITS = ("train", "valid_seen", "valid_unseen", "valid_train")
INSTALL_HINT = "pip install 'leafe[alfworld]'"

# The game's own `help` text, shortened: without few-shot examples a model has no other way to learn
# the command syntax (ALFWorld's newer "move X to Y" replaced the "put X in/on Y" of older prompts).
COMMANDS = (
    "You are in a household. Act with one text command per step: look; inventory; go to (receptacle); "
    "open (receptacle); close (receptacle); take (object) from (receptacle); move (object) to "
    "(receptacle); examine (something); use (object); heat (object) with (receptacle); clean (object) "
    "with (receptacle); cool (object) with (receptacle); slice (object) with (object). Name things "
    "with their number as you see them, e.g. 'take apple 1 from countertop 1'."
)


def default_data_dir() -> Path:
    """$ALFWORLD_DATA, else ALFWorld's own default (~/.cache/alfworld)."""
    return Path(os.environ.get("ALFWORLD_DATA") or Path.home() / ".cache" / "alfworld")


@functools.lru_cache(maxsize=16)
def game_files(data_dir: Path, split: str) -> tuple[str, ...]:
    """The playable games of a split, as paths relative to `data_dir`, sorted (the task order).

    Filtered like ALFWorld's `AlfredTWEnv`: no movable-receptacle or sliced-object trials (its text
    engine does not support them) and no game marked unsolvable. Cached: listing a split parses
    every game file.
    """
    root = data_dir / "json_2.1.1" / split
    found = sorted(root.glob("**/game.tw-pddl")) if root.is_dir() else []
    if not found:
        AlfWorldEnv.data_status(data_dir=str(data_dir), split=split).require()
    games = []
    for path in found:
        relative = path.relative_to(data_dir).as_posix()
        if "movable" in relative or "Sliced" in relative:
            continue
        if read_json(path).get("solvable", True) is False:
            continue
        games.append(relative)
    return tuple(games)


def _textworld():
    """textworld's PDDL engine and ALFWorld's demangler, imported on first use (optional extra), with
    the engine's translations served from the cache."""
    try:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
        from textworld.envs.pddl import PddlEnv, logic
    except ImportError as exc:
        raise EnvError(
            f"the alfworld env needs alfworld and textworld ({exc.name} is missing): {INSTALL_HINT}"
        ) from None
    if not isinstance(logic.fast_downward, _CachedTranslator):
        logic.fast_downward = _CachedTranslator(logic.fast_downward)
    return textworld, PddlEnv, AlfredDemangler, logic


def _engine(**infos: Any):
    """A demangled PDDL env, as ALFWorld evaluates (no shuffled names). Each one dlopens its own copy
    of fast-downward's library and never unloads it, so an env keeps one engine for all its games."""
    textworld, _, AlfredDemangler, _ = _textworld()
    env = _cached_pddl_env()(textworld.EnvInfos(won=True, admissible_commands=True, **infos))
    return AlfredDemangler(env, shuffle=False)


@functools.cache
def _cached_pddl_env() -> type:
    """textworld's `PddlEnv` with the parsed grammar of a game from the cache."""
    _, PddlEnv, _, logic = _textworld()

    class CachedPddlEnv(PddlEnv):
        def load(self, path: str) -> None:
            """textworld 1.7's `PddlEnv.load`, step for step, but for where the grammar comes from."""
            if not USE_CACHE:
                return super().load(path)
            data = expect(read_json(path), dict, path, ("pddl_domain", "grammar", "pddl_problem"))
            self._game_file, self._game_data, self.walkthrough = path, data, data.get("walkthrough")
            domain, grammar = data["pddl_domain"], data["grammar"]
            self._logic = cached("grammar", [domain, grammar], lambda: logic.GameLogic(domain=domain, grammar=grammar))
            self._pddl_state = logic.PddlState(self.downward_lib, data["pddl_problem"], self._logic)
            self._entity_infos = self._get_entity_infos()

    return CachedPddlEnv


# -- what textworld rebuilds from a game file, cached ------------------------------------------
#: Off: every load parses and translates, and every reset translates, as textworld alone does (the
#: benchmark's "before").
USE_CACHE = True
#: Bumped when what is pickled changes, so old cache files are not read.
_CACHE_FORMAT = 1
#: Pickles of a game: its grammar (~40 kB) and two translations (~0.4 MB each): ~50 MB for 64 games.
_MEMORY_ITEMS = 3 * 64
_memory: OrderedDict[str, bytes] = OrderedDict()


class _CachedTranslator:
    """The `fast_downward` module as textworld's PDDL logic sees it, with `pddl2sas` answered from the
    cache. textworld calls the translator through that module global and has no other hook; every
    other attribute is the module's own."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    def pddl2sas(self, domain: str, problem: str, verbose: bool = False, optimize: bool = False):
        if verbose or not USE_CACHE:
            return self._module.pddl2sas(domain, problem, verbose=verbose, optimize=optimize)
        return cached("translation", [optimize, domain, problem],
                      lambda: self._module.pddl2sas(domain, problem, optimize=optimize))


def cached(kind: str, inputs: list, build: Callable[[], Any]) -> Any:
    """`build()`, which depends only on `inputs`: from memory, else from the disk cache, else built
    and stored in both. Kept as pickles, so each call gets its own copy (a few ms to unpickle) and no
    two games share objects that the engine mutates."""
    key = hashlib.sha256(json.dumps([_CACHE_FORMAT, kind, _textworld_versions(), *inputs]).encode()).hexdigest()
    path = cache_dir("alfworld") / key[:2] / f"{key}.pkl"
    for data in (_memory.get(key), _read_bytes(path)):
        if data is None:
            continue
        try:
            value = pickle.loads(data)
        except Exception:  # a truncated or foreign cache file: build again and overwrite it
            continue
        _remember(key, data)
        return value
    value = build()
    data = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    _remember(key, data)
    try:
        write_bytes(path, data)
    except OSError:
        pass  # an unwritable cache only costs time
    return value


@functools.cache
def _textworld_versions() -> tuple[str, ...]:
    """The installed textworld and fast-downward: others may parse or translate differently."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("textworld", "fast_downward_textworld"):
        try:
            found.append(version(name))
        except PackageNotFoundError:
            found.append("unknown")
    return tuple(found)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _remember(key: str, data: bytes) -> None:
    _memory[key] = data
    _memory.move_to_end(key)
    while len(_memory) > _MEMORY_ITEMS:
        _memory.popitem(last=False)


def _load(engine, path: Path) -> None:
    if not path.is_file():
        raise EnvError(f"ALFWorld game file {path} does not exist; check data_dir / ALFWORLD_DATA")
    engine.load(str(path))  # parses the grammar and builds the initial state (both cached)


def split_intro(text: str) -> tuple[str, str]:
    """(room description, goal line) of a game's intro, without the '-= Welcome ... =-' banner."""
    parts = [p.strip() for p in text.split("\n\n") if p.strip() and not p.lstrip().startswith("-=")]
    goal = [p for p in parts if p.startswith("Your task is to:")]
    room = [p for p in parts if not p.startswith("Your task is to:")]
    return "\n\n".join(room), (goal[-1] if goal else "")


def normalize_command(action: str) -> str:
    """ALFWorld matches commands exactly; forgive case, spacing and a final period, nothing more."""
    return " ".join(action.split()).lower().rstrip(".").rstrip()


@register
class AlfWorldEnv(Env):
    """ALFWorld text games with a step limit; rollback by replay (see the module docstring)."""

    name = "alfworld"

    def __init__(self, data_dir: str | None = None, split: str = "valid_seen", max_steps: int = 50,
                 valid_action_hints: bool = False):
        """`data_dir`: the folder holding json_2.1.1 (else $ALFWORLD_DATA, else ~/.cache/alfworld).
        `split`: train, valid_seen, valid_unseen or valid_train. `max_steps`: 50, as in ReAct's
        ALFWorld runs. `valid_action_hints`: append the game's list of valid commands to every
        observation (the setting where the agent picks from a list)."""
        if split not in SPLITS:
            raise EnvError(f"unknown ALFWorld split {split!r}; use one of {', '.join(SPLITS)}")
        if max_steps < 1:
            raise EnvError(f"ALFWorld max_steps must be >= 1 (got {max_steps})")
        _textworld()  # fail now, with the install hint, rather than at the first reset
        self.data_status(data_dir=data_dir, split=split).require()
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.split, self.max_steps, self.valid_action_hints = split, max_steps, valid_action_hints
        self._game = None  # the textworld env playing the episode
        self._game_path: Path | None = None  # the game file loaded in it
        self._planner = None  # a second engine for expert plans, made on first use
        self._admissible: list[str] = []
        self._steps = 0
        self._done = False

    @classmethod
    def data_status(cls, data_dir: str | None = None, split: str = "valid_seen", **_: object) -> DataStatus:
        """The split's game files under `data_dir`, else $ALFWORLD_DATA, else ~/.cache/alfworld."""
        root = (Path(str(data_dir)) if data_dir else default_data_dir()) / "json_2.1.1" / split
        if root.is_dir() and next(root.glob("**/game.tw-pddl"), None) is not None:  # one is enough: cheap
            return DataStatus(True, str(root))
        return DataStatus(False, str(root), (
            f"no ALFWorld games (game.tw-pddl) under {root}: {INSTALL_HINT}, run `alfworld-download` on a machine "
            f"with internet, copy the data here and set $ALFWORLD_DATA (or data_dir=) to its folder"))

    # -- tasks ---------------------------------------------------------------------------------
    def make_tasks(self, n: int, seed: int) -> list[Task]:
        """Games seed..seed+n-1 of the split, in sorted path order."""
        games = game_files(self.data_dir, self.split)
        if seed < 0 or n < 0 or seed + n > len(games):
            raise EnvError(f"ALFWorld split {self.split!r} has {len(games)} games; asked for {n} from index {seed}")
        return [
            Task(task_id=f"alfworld-{self.split}-{i}", env=self.name,
                 spec={"game": games[i], "task_type": Path(games[i]).parts[-3].split("-")[0]})
            for i in range(seed, seed + n)
        ]

    def expert_actions(self, task: Task) -> list[str] | None:
        """The game's walkthrough (ALFWorld's hand-coded expert, stored in the file), else a plan
        from fast-downward for the initial state."""
        path = self._path(task)
        walkthrough = read_json(path).get("walkthrough")
        if walkthrough:
            return list(walkthrough)
        # A separate engine: planning must not disturb the episode this env may be in.
        if self._planner is None:
            self._planner = _engine(policy_commands=True)
        _load(self._planner, path)
        return list(self._planner.reset()["policy_commands"]) or None

    # -- episode -------------------------------------------------------------------------------
    def reset(self, task: Task) -> str:
        path = self._path(task)
        if self._game is None:
            self._game = _engine()
        if path != self._game_path:  # a replay resets the same game: skip re-parsing its grammar
            self._game_path = None  # until the load succeeds
            _load(self._game, path)
            self._game_path = path
        state = self._game.reset()
        room, goal = split_intro(state.feedback)
        if not goal:
            raise EnvError(f"ALFWorld game {path} has no 'Your task is to:' goal in its intro")
        self.instruction = f"{COMMANDS}\n\n{goal}"
        self._admissible = list(state["admissible_commands"])
        self._steps, self._done = 0, False
        return self._observation(room)

    def step(self, action: str) -> StepResult:
        self.check_running(started=self._game_path is not None, ended=self._done, what="game")
        command = normalize_command(action)
        info: dict[str, Any] = {"invalid": command not in self._admissible}
        state, _, _ = self._game.step(command)
        self._steps += 1
        self._admissible = list(state["admissible_commands"])
        success = bool(state["won"])
        self._done = success or self._steps >= self.max_steps
        text = state.feedback.strip()
        if self._done and not success:
            text += f"\nNo steps left ({self.max_steps} used): the task was not completed."
        return StepResult(self._observation(text), 1.0 if success else 0.0, self._done, success, info)

    @property
    def admissible_commands(self) -> list[str]:
        """The game's valid commands in the current state (what `valid_action_hints` lists)."""
        return list(self._admissible)

    def admissible_actions(self) -> list[str] | None:
        return self.admissible_commands

    def _observation(self, text: str) -> str:
        if not self.valid_action_hints or self._done:
            return text
        return f"{text}\nValid actions: {', '.join(self._admissible)}"

    def _path(self, task: Task) -> Path:
        if "game" not in task.spec:
            raise EnvError(f"ALFWorld task {task.task_id!r} has no 'game' path in its spec")
        return self.data_dir / task.spec["game"]
