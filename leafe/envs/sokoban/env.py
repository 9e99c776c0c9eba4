"""The Sokoban env: the paper's first benchmark, with a step limit and rollback by snapshot.

Observations show the grid with `_` for floor (so a tokenizer never has to count spaces) plus the
coordinates of the player, boxes and goals, and a line of feedback saying what the last action did,
including when a push made the level unsolvable: that feedback is the signal LEAFE reflects on.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from leafe.envs.base import DataStatus, Env, EnvError, StepResult, Task
from leafe.envs.registry import register
from leafe.envs.sokoban.generator import generate
from leafe.envs.sokoban.levels import (
    Room,
    State,
    dead_squares,
    move,
    parse_direction,
    parse_xsb,
    read_collection,
    render,
)
from leafe.envs.sokoban.oracle import NO_MISTAKE, Expert, first_mistake, oracle_experience, reflection_reply
from leafe.envs.sokoban.solver import SolverLimit, distance_table, plan_thought, solve, solve_state

# Bound on solver states when the env checks, after a push, whether the level is still solvable.
# Small levels need a few hundred; past the bound the env reports "unknown" rather than stalling.
_SOLVABILITY_CHECK_STATES = 50_000
#: Rooms whose distance table would exceed this many states get no "cannot be solved in the moves
#: left" feedback (the generated benchmark rooms have a few hundred).
_DISTANCE_TABLE_STATES = 200_000


INSTRUCTION = (
    "Sokoban: push every box onto a goal. You move one square per action. Walking into a box pushes "
    "it one square, if the square behind it is free. You cannot pull boxes or push two at once. A box "
    "pushed into a corner that is not a goal is stuck for good. Symbols: # wall, _ floor, . goal, "
    "$ box, * box on goal, @ you, + you on a goal. Positions are (row, column) from the top-left, "
    "starting at 0. Actions: up, down, left, right."
)


@functools.lru_cache(maxsize=512)
def _level_table(xsb: str) -> dict[State, int] | None:
    """The distance table of a level, or None for rooms too big to tabulate. Cached: every episode,
    replay and branch resets a fresh env on the same few levels."""
    try:
        return distance_table(parse_xsb(xsb)[0], _DISTANCE_TABLE_STATES)
    except SolverLimit:
        return None


@register
class SokobanEnv(Env):
    """Sokoban with a step limit; rollback by snapshot (the state is a player cell and a box set)."""

    name = "sokoban"
    supports_snapshot = True
    has_oracle_reflection = True

    def __init__(
        self, max_steps: int = 15, dim: tuple[int, int] = (6, 6), boxes: int = 1, levels: str | None = None,
        end_when_lost: bool = False,
    ):
        """`max_steps`: moves before the episode ends unsolved. `dim`: (rows, columns) of a generated
        level. `boxes`: boxes in a generated level. `levels`: an XSB collection file to take tasks from
        instead of generating them. `end_when_lost`: end the episode at the step after which the level
        can no longer be solved in the moves left (its outcome can no longer change, so an evaluation
        loses nothing and skips the turns that cannot matter; training sees shorter failures)."""
        if max_steps < 1:
            raise EnvError(f"Sokoban max_steps must be >= 1 (got {max_steps})")
        if not isinstance(end_when_lost, bool):  # a string "False" would otherwise read as true
            raise EnvError(f"Sokoban end_when_lost must be true or false (got {end_when_lost!r})")
        self.data_status(levels=levels).require()
        self.max_steps = max_steps
        self.dim = (int(dim[0]), int(dim[1]))
        self.boxes = boxes
        self.levels = levels
        self.end_when_lost = end_when_lost
        self.instruction = INSTRUCTION
        self._room: Room | None = None
        self._state: State | None = None
        self._steps = 0
        self._done = False
        self._table: dict[State, int] | None = None  # the level's distance table, for feedback

    # -- tasks ---------------------------------------------------------------------------------
    @classmethod
    def data_status(cls, levels: str | None = None, **_: object) -> DataStatus:
        """Levels are generated from seeds; nothing to download unless you bring a `levels` file."""
        if levels is None:
            return DataStatus(True, "generated from seeds, nothing needed")
        if Path(str(levels)).is_file():
            return DataStatus(True, str(levels))
        return DataStatus(False, str(levels), f"levels={levels} does not exist; give the path of an XSB collection "
                                              f"file, or leave levels= out to generate levels")

    def make_tasks(self, n: int, seed: int) -> list[Task]:
        """Generated levels from seeds seed..seed+n-1, or the first n levels of the `levels` file."""
        if self.levels is not None:
            collection = read_collection(self.levels)
            if len(collection) < n:
                raise EnvError(f"{self.levels} has {len(collection)} levels; asked for {n} tasks")
            return [
                Task(task_id=f"sokoban-{Path(self.levels).stem}-{i}", env=self.name, spec={"xsb": xsb})
                for i, xsb in enumerate(collection[:n])
            ]
        return [
            Task(
                task_id=f"sokoban-{seed + i}",
                env=self.name,
                spec={"xsb": generate(seed + i, self.dim, self.boxes, max_moves=self.max_steps), "seed": seed + i},
            )
            for i in range(n)
        ]

    @classmethod
    def from_xsb(cls, text: str, max_steps: int = 15, **params: Any) -> SokobanEnv:
        """An env already reset to the given level (`params`: the constructor's other settings)."""
        env = cls(max_steps=max_steps, **params)
        env.reset(Task(task_id="xsb", env=cls.name, spec={"xsb": text}))
        return env

    def expert_actions(self, task: Task) -> list[str] | None:
        return solve(task.spec["xsb"])

    def oracle_reflection(self, task: Task, actions: Sequence[str]) -> str:
        # The bootstrap's reflection examples are written by the same functions, so an oracle
        # reflection reads exactly like the ones the embedded agent was taught to write.
        table = _level_table(task.spec["xsb"])
        if table is None:
            raise EnvError(f"level {task.task_id} is too big to tabulate; the oracle cannot grade it")
        room, start = parse_xsb(task.spec["xsb"])
        expert = Expert(room, start, table, self.max_steps)
        step = first_mistake(expert, list(actions))
        if step is None:
            return reflection_reply(None, NO_MISTAKE)
        return reflection_reply(step, oracle_experience(expert, list(actions), step))

    def expert_thought(self, action: str) -> str:
        # The expert knows its plan and says it, in the embedded agent's own phrasing; a plain
        # "go X." here taught the plan agent to stop planning (docs/experiment-log.md, "Plan thoughts").
        if self._table is None:  # a room too big to tabulate: no plan to voice
            return f"go {action}."
        return plan_thought(self._room, self._table, self._state, action)

    # -- episode -------------------------------------------------------------------------------
    def reset(self, task: Task) -> str:
        if "xsb" not in task.spec:
            raise EnvError(f"Sokoban task {task.task_id!r} has no 'xsb' level in its spec")
        self._room, self._state = parse_xsb(task.spec["xsb"])
        self._steps, self._done = 0, False
        self._table = _level_table(task.spec["xsb"])
        return self._observation("A new level.")

    def _winnable(self, state: State, moves_left: int) -> bool | None:
        """Whether `state` can still be solved in `moves_left` moves (None: room too big to know)."""
        if self._table is None:
            return None
        d = self._table.get(state)
        return d is not None and d <= moves_left

    def step(self, action: str) -> StepResult:
        room, state = self._require_started(ended=self._done)
        self._steps += 1
        info: dict = {"invalid": False, "moved": False, "pushed": False}
        direction = parse_direction(action)
        if direction is None:
            info["invalid"] = True
            shown = action.strip().splitlines()[0][:40] if action.strip() else ""
            feedback = f"Invalid action {shown!r}: answer with one of up, down, left, right. Nothing moved."
        else:
            new_state, what = move(room, state, direction)
            self._state = new_state
            feedback = self._describe(direction, what, state, new_state, info)
        success = self._state.boxes <= room.goals
        # Say so at the one step that loses the level (a box stuck, or too many moves wasted): this
        # is the feedback a reflection can point back to.
        left = self.max_steps - self._steps
        # It names the step, as the "Step t: action" header before this observation does.
        if not success and self._winnable(state, left + 1) and self._winnable(self._state, left) is False:
            info["lost"] = True
            feedback += f" From step {self._steps - 1} on, the level can no longer be solved in the {left} moves left."
        # Lost for certain: beyond the moves left by the distance table, or (a room too big for the
        # table) a box stuck or jammed, which the solver proved.
        lost = info.get("lost", False) or (self._table is None and info.get("solvable") is False)
        self._done = success or self._steps >= self.max_steps or (self.end_when_lost and lost)
        if success:
            feedback += " All boxes are on goals: solved!"
        elif self._steps >= self.max_steps:
            feedback += f" No moves left ({self.max_steps} used): the level was not solved."
        elif self._done:
            feedback += " The attempt ends here."
        info["boxes_on_goals"] = len(self._state.boxes & room.goals)
        return StepResult(self._observation(feedback), 1.0 if success else 0.0, self._done, success, info)

    def _describe(self, direction: str, what: str, before: State, after: State, info: dict) -> str:
        room = self._room
        if what == "wall":
            return f"You bumped into a wall moving {direction}; nothing moved."
        if what == "blocked-wall":
            return f"The box cannot be pushed {direction}: a wall is behind it. Nothing moved."
        if what == "blocked-box":
            return f"The box cannot be pushed {direction}: another box is behind it. Nothing moved."
        info["moved"] = True
        if what == "moved":
            return f"You moved {direction}."
        info["pushed"] = True
        (box,) = after.boxes - before.boxes
        text = f"You pushed a box {direction}" + (" onto a goal." if box in room.goals else ".")
        if box in dead_squares(room) and box not in room.goals:
            info["solvable"] = False
            return text + " That box is now stuck where it can never reach a goal." + self._lost_without_table
        try:
            solvable = solve_state(room, after, max_states=_SOLVABILITY_CHECK_STATES) is not None
        except SolverLimit:
            solvable = None
        info["solvable"] = solvable
        if solvable is False:
            return text + " The boxes are now jammed." + self._lost_without_table
        return text

    @property
    def _lost_without_table(self) -> str:
        """Where no distance table marks the losing step, a stuck box says the level is lost itself."""
        return " The level can no longer be solved." if self._table is None else ""

    def _observation(self, feedback: str) -> str:
        room, state = self._require_started()
        left = self.max_steps - self._steps
        where = lambda cells: " ".join(f"({r},{c})" for r, c in sorted(room.coords(x) for x in cells))  # noqa: E731
        return (
            f"{feedback}\n{render(room, state, floor='_')}\n"
            f"you ({','.join(map(str, room.coords(state.player)))}); boxes {where(state.boxes)}; goals {where(room.goals)}; "
            f"moves left {left}"
        )

    def to_xsb(self) -> str:
        """The current state as a standard XSB level (spaces for floor)."""
        room, state = self._require_started()
        return render(room, state)

    @property
    def steps_taken(self) -> int:
        return self._steps

    # -- rollback ------------------------------------------------------------------------------
    def snapshot(self) -> tuple:
        room, state = self._require_started()
        return (room, state, self._steps, self._done, self._table)  # the table is shared, never copied

    def restore(self, snapshot: tuple) -> None:
        self._room, self._state, self._steps, self._done, self._table = snapshot

    def _require_started(self, ended: bool = False) -> tuple[Room, State]:
        self.check_running(started=self._room is not None and self._state is not None, ended=ended, what="level")
        return self._room, self._state
