"""TextWorld: generated text adventures (find the key, open the chest, put the apple on the table).

Games are generated offline by TextWorld's own generator (what `tw-make custom` runs), one per
seed, and compiled once into a cache ($LEAFE_CACHE/textworld); or taken from a directory of games
you made yourself (`games=DIR`, any `tw-make` output). Success is the game's won flag; a lost game
ends the episode as a failure. The expert is the game's walkthrough.

Rollback by snapshot: the game runs in a Z-machine interpreter (Jericho) whose whole state, with
TextWorld's tracking of the quest, `env.copy()` duplicates. It is not cheap (mostly a deep copy of
TextWorld's Python game state): it costs as much as many steps, so a replay of a short prefix costs
less; `explore --no-snapshots` picks replay (BENCHMARKS.md, "Environments", has both).
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from leafe.envs.base import DataStatus, Env, EnvError, StepResult, Task
from leafe.envs.registry import register
from leafe.files import cache_dir, read_json

INSTALL_HINT = "pip install 'leafe[textworld]'"
PACKAGE_MISSING = f"the textworld env needs the textworld package: {INSTALL_HINT}"
#: TextWorld's command language is the same in every generated game; the agent is told it once.
COMMANDS = ("look, inventory, go north/south/east/west, examine X, take X, take X from Y, drop X, put X on Y, "
            "insert X into Y, open X, close X, unlock X with Y, lock X with Y, eat X")
GAME_SUFFIXES = (".z8", ".ulx")


def _textworld() -> Any:
    try:
        import textworld
    except ImportError:
        raise EnvError(PACKAGE_MISSING) from None
    return textworld


def generate_game(seed: int, rooms: int, objects: int, quest_length: int, out_dir: Path) -> Path:
    """The compiled game for these settings, generated and compiled on first use (a few seconds).
    Built in a scratch dir and moved into place, so a killed run never leaves a half-written game."""
    path = out_dir / f"tw-r{rooms}-o{objects}-q{quest_length}-s{seed}.z8"
    if path.exists():
        return path
    textworld = _textworld()
    options = textworld.GameOptions()
    options.nb_rooms, options.nb_objects, options.quest_length = rooms, objects, quest_length
    options.seeds = seed
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".building-") as scratch:
        options.path = str(Path(scratch) / path.name)
        try:
            built = Path(textworld.generator.compile_game(textworld.generator.make_game(options), options))
        except Exception as error:  # the generator's own errors say little about which settings failed
            raise EnvError(f"TextWorld could not generate a game with rooms={rooms}, objects={objects}, "
                           f"quest_length={quest_length}, seed={seed}: {error}") from error
        # The .json beside the game holds what the interpreter's infos need (objective, walkthrough).
        os.replace(built.with_suffix(".json"), path.with_suffix(".json"))
        os.replace(built, path)
    return path


def check_game(path: Path) -> Path:
    """A game file the interpreter can run, else one EnvError naming it: Jericho ends the whole process
    ("Fatal error: Story file read error") on a file that is not a story or is cut short, so the header
    is checked first (a Z-machine file gives its version and length at bytes 0 and 0x1a, a Glulx one its
    length at byte 12); and the .json beside it, which TextWorld reads for the quest, must be JSON."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] == b"Glul":
        length = int.from_bytes(head[12:16], "big")
    elif len(head) == 64 and 1 <= head[0] <= 8:
        length = int.from_bytes(head[0x1A:0x1C], "big") * (2 if head[0] <= 3 else 4 if head[0] <= 5 else 8)
    else:
        raise EnvError(f"TextWorld game {path} is not a Z-machine or Glulx story file; is it the right file?")
    if size < length:
        raise EnvError(f"TextWorld game {path} is truncated ({size} bytes of the {length} its header gives); "
                       f"copy or make it again")
    if path.with_suffix(".json").is_file():
        read_json(path.with_suffix(".json"))
    return path


def clean(text: str) -> str:
    """A game's output without the interpreter's furniture: the end-of-game menu, the trailing
    '>' prompt with its status line, and runs of blank lines."""
    text = text.split("*** The End ***")[0]
    text = re.sub(r"\n>[^\n]*\s*$", "", text.rstrip())
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


@register
class TextWorldEnv(Env):
    """TextWorld games with a step limit; rollback by snapshot (a copy of the interpreter)."""

    name = "textworld"
    supports_snapshot = True

    def __init__(self, rooms: int = 3, objects: int = 6, quest_length: int = 3, max_steps: int = 30,
                 games: str | None = None, valid_action_hints: bool = False):
        """`rooms`, `objects`, `quest_length`: the generator's settings (`tw-make custom` flags
        --world-size, --nb-objects, --quest-length). `games`: a directory of your own compiled
        games to use instead. `max_steps`: steps before the episode ends unsolved. `valid_action_hints`: list the admissible commands under each
        observation."""
        if min(rooms, objects, quest_length, max_steps) < 1:
            raise EnvError(f"TextWorld rooms, objects, quest_length and max_steps must be >= 1 (got {rooms}, "
                           f"{objects}, {quest_length}, {max_steps})")
        self.data_status(games=games).require()
        self.rooms, self.objects, self.quest_length = rooms, objects, quest_length
        self.max_steps, self.games = max_steps, games
        self.valid_action_hints = bool(valid_action_hints)
        self._env: Any = None
        self._steps = 0
        self._done = False

    @classmethod
    def data_status(cls, games: str | None = None, **_: object) -> DataStatus:
        """Games are generated by the textworld package (or are your own, `games=DIR`)."""
        if importlib.util.find_spec("textworld") is None:
            return DataStatus(False, "the textworld package is not installed", PACKAGE_MISSING)
        if games is None:
            return DataStatus(True, f"generated from seeds into {cache_dir('textworld')}")
        found = [p for p in Path(str(games)).glob("*") if p.suffix in GAME_SUFFIXES]
        if found:
            return DataStatus(True, f"{games} ({len(found)} games)")
        return DataStatus(False, str(games), f"{games} holds no TextWorld games (*.z8, *.ulx): make some with "
                                             f"`tw-make`, or leave games= out to generate them")

    # -- tasks ---------------------------------------------------------------------------------
    def make_tasks(self, n: int, seed: int) -> list[Task]:
        """Games from seeds seed..seed+n-1 (generated now if not cached), or games seed..seed+n-1
        of the `games` directory in name order."""
        if self.games is not None:
            found = sorted(p for p in Path(self.games).glob("*") if p.suffix in GAME_SUFFIXES)
            if seed < 0 or seed + n > len(found):
                raise EnvError(f"{self.games} has {len(found)} TextWorld games (*.z8, *.ulx); asked for {n} "
                               f"from index {seed}")
            return [Task(f"textworld-{p.stem}", self.name, {"game": str(p.resolve())}) for p in found[seed:seed + n]]
        settings = {"rooms": self.rooms, "objects": self.objects, "quest_length": self.quest_length}
        tasks = []
        for s in range(seed, seed + n):
            generate_game(s, **settings, out_dir=cache_dir("textworld"))
            tasks.append(Task(f"textworld-r{self.rooms}-o{self.objects}-q{self.quest_length}-{s}", self.name,
                              {"seed": s, **settings}))
        return tasks

    def _game_path(self, task: Task) -> Path:
        spec = task.spec
        if "game" in spec:
            path = Path(spec["game"])
            if not path.exists():
                raise EnvError(f"TextWorld game {path} of task {task.task_id!r} does not exist")
            return check_game(path)
        missing = {"seed", "rooms", "objects", "quest_length"} - set(spec)
        if missing:
            raise EnvError(f"TextWorld task {task.task_id!r} lacks {', '.join(sorted(missing))} (or a 'game' path)")
        return generate_game(spec["seed"], spec["rooms"], spec["objects"], spec["quest_length"], cache_dir("textworld"))

    def expert_actions(self, task: Task) -> list[str] | None:
        game = _textworld().Game.load(str(self._game_path(task).with_suffix(".json")))
        return list(game.walkthrough or []) or None

    # -- episode -------------------------------------------------------------------------------
    def reset(self, task: Task) -> str:
        textworld = _textworld()
        infos = textworld.EnvInfos(objective=True, description=True, won=True, lost=True,
                                   admissible_commands=self.valid_action_hints)
        if self._env is not None:
            self._env.close()
        self._env = textworld.start(str(self._game_path(task)), request_infos=infos)
        state = self._env.reset()
        self._steps, self._done = 0, False
        self.instruction = f"{clean(state.objective)}\nCommands: {COMMANDS}."
        return self._with_hints(clean(state.description), state)

    def step(self, action: str) -> StepResult:
        self.check_running(started=self._env is not None, ended=self._done, what="game")
        self._steps += 1
        state, _, _ = self._env.step(action.strip())
        observation = clean(state.feedback)
        success, lost = bool(state.won), bool(state.lost)
        self._done = success or lost or self._steps >= self.max_steps
        if success:
            observation += "\nYou won: the quest is complete."
        elif lost:
            observation += "\nYou lost: the quest can no longer be completed."
        elif self._done:
            observation += f"\nNo steps left ({self.max_steps} used): the quest was not completed."
        return StepResult(self._with_hints(observation, state), 1.0 if success else 0.0, self._done, success,
                          {"invalid": "not a verb i recognise" in observation.lower()})

    def _with_hints(self, observation: str, state: Any) -> str:
        if not self.valid_action_hints or self._done:
            return observation
        return f"{observation}\nValid actions: {', '.join(state.admissible_commands)}"

    def snapshot(self) -> tuple:
        self.check_running(started=self._env is not None, what="game")
        return (self._env.copy(), self._steps, self._done, self.instruction)

    def restore(self, snapshot: tuple) -> None:
        env, self._steps, self._done, self.instruction = snapshot
        if self._env is not None:
            self._env.close()
        self._env = env.copy()  # a copy again: a snapshot may be restored many times

