"""Sokoban, written from scratch: XSB levels, an optimal BFS solver, reverse-play generation, the env.

The paper's first benchmark. Levels use the standard XSB text format (`#` wall, space floor, `.`
goal, `$` box, `*` box on goal, `@` player, `+` player on goal; `-` and `_` are accepted as floor).
Generated levels are built the way gym-sokoban builds them: carve a room, put the boxes on their
goals, then play backwards (the player *pulls* boxes) so every level is solvable by construction;
the solver confirms it and bounds the solution length. Observations show the grid with `_` for
floor (so a tokenizer never has to count spaces) plus the coordinates of the player, boxes and goals,
and a line of feedback saying what the last action did, including when a push made the level
unsolvable: that feedback is the signal LEAFE reflects on.
"""

from __future__ import annotations

import functools
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from leafe.envs.base import Env, EnvError, StepResult, Task
from leafe.envs.registry import register

ACTIONS: dict[str, tuple[int, int]] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}

WALL, FLOOR, GOAL, BOX, BOX_ON_GOAL, PLAYER, PLAYER_ON_GOAL = "#", " ", ".", "$", "*", "@", "+"
_FLOOR_ALIASES = {" ", "-", "_"}
_KNOWN = {WALL, GOAL, BOX, BOX_ON_GOAL, PLAYER, PLAYER_ON_GOAL} | _FLOOR_ALIASES

# Bound on solver states when the env checks, after a push, whether the level is still solvable.
# Small levels need a few hundred; past the bound the env reports "unknown" rather than stalling.
_SOLVABILITY_CHECK_STATES = 50_000
#: Rooms whose distance table would exceed this many states get no "cannot be solved in the moves
#: left" feedback (the generated benchmark rooms have a few hundred).
_DISTANCE_TABLE_STATES = 200_000


@dataclass(frozen=True)
class Room:
    """The static part of a level. Cells are indices `row * width + col`."""

    height: int
    width: int
    walls: frozenset[int]
    goals: frozenset[int]
    inside: frozenset[int]  # floor cells the player can ever stand on or push a box into

    def cell(self, row: int, col: int) -> int:
        return row * self.width + col

    def coords(self, cell: int) -> tuple[int, int]:
        return divmod(cell, self.width)

    def offset(self, action: str) -> int:
        dr, dc = ACTIONS[action]
        return dr * self.width + dc


@dataclass(frozen=True)
class State:
    """The dynamic part of a level: where the player and the boxes are."""

    player: int
    boxes: frozenset[int]


def parse_xsb(text: str) -> tuple[Room, State]:
    """Parse an XSB level; raises `EnvError` naming what is wrong with a malformed one."""
    lines = [line.rstrip("\r") for line in text.strip("\n").split("\n")]
    lines = [line for line in lines if line.strip()] if lines else []
    if not lines:
        raise EnvError("empty Sokoban level: expected XSB rows such as '#####'")
    height, width = len(lines), max(len(line) for line in lines)
    walls, goals, boxes, players = set(), set(), set(), []
    for r, line in enumerate(lines):
        for c, ch in enumerate(line.ljust(width)):
            if ch not in _KNOWN:
                raise EnvError(
                    f"Sokoban level has unknown character {ch!r} at row {r}, column {c}; "
                    f"XSB uses # wall, space/-/_ floor, . goal, $ box, * box on goal, @ player, + player on goal"
                )
            cell = r * width + c
            if ch == WALL:
                walls.add(cell)
                continue
            if ch in (GOAL, BOX_ON_GOAL, PLAYER_ON_GOAL):
                goals.add(cell)
            if ch in (BOX, BOX_ON_GOAL):
                boxes.add(cell)
            if ch in (PLAYER, PLAYER_ON_GOAL):
                players.append(cell)
    if not players:
        raise EnvError("Sokoban level has no player: mark the player's cell with '@' (or '+' on a goal)")
    if len(players) > 1:
        spots = ", ".join(f"row {p // width} col {p % width}" for p in players)
        raise EnvError(f"Sokoban level has {len(players)} players ({spots}); keep exactly one '@' or '+'")
    if not boxes:
        raise EnvError("Sokoban level has no box: add at least one '$' (or '*')")
    if len(boxes) != len(goals):
        raise EnvError(
            f"Sokoban level has {len(boxes)} boxes but {len(goals)} goals; every box needs exactly one goal"
        )
    player = players[0]
    inside = _flood_inside(height, width, walls, player)
    stray = sorted((boxes | goals) - inside)
    if stray:
        r, c = divmod(stray[0], width)
        raise EnvError(f"Sokoban level has a box or goal at row {r}, column {c} that the player can never reach")
    room = Room(height, width, frozenset(walls), frozenset(goals), frozenset(inside))
    return room, State(player, frozenset(boxes))


def _flood_inside(height: int, width: int, walls: set[int], start: int) -> set[int]:
    """Cells reachable from the player through non-wall cells; the room must be closed by walls."""
    seen, queue = {start}, deque([start])
    while queue:
        cell = queue.popleft()
        r, c = divmod(cell, width)
        for dr, dc in ACTIONS.values():
            nr, nc = r + dr, c + dc
            if not (0 <= nr < height and 0 <= nc < width):
                raise EnvError(
                    f"Sokoban level is open: the player can walk off the map past row {r}, column {c}; "
                    f"close the room with '#' walls"
                )
            nxt = nr * width + nc
            if nxt not in walls and nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return seen


def render(room: Room, state: State, floor: str = FLOOR) -> str:
    """XSB text of a state. Cells outside the room stay blank; `floor` draws the cells inside it."""
    rows = []
    for r in range(room.height):
        row = []
        for c in range(room.width):
            cell = r * room.width + c
            goal, box = cell in room.goals, cell in state.boxes
            if cell in room.walls:
                row.append(WALL)
            elif cell == state.player:
                row.append(PLAYER_ON_GOAL if goal else PLAYER)
            elif box:
                row.append(BOX_ON_GOAL if goal else BOX)
            elif goal:
                row.append(GOAL)
            else:
                row.append(floor if cell in room.inside else " ")
        rows.append("".join(row).rstrip())
    return "\n".join(rows)


def dead_squares(room: Room) -> frozenset[int]:
    """Inside cells from which a lone box can never be pushed onto any goal.

    Computed backwards from the goals: a box at `s` can have come from `s - d` if the player could
    stand at `s - 2d` to push it. Any inside cell not reached this way is dead.
    """
    live, queue = set(room.goals), deque(room.goals)
    while queue:
        cell = queue.popleft()
        for action in ACTIONS:
            d = room.offset(action)
            prev, stand = cell - d, cell - 2 * d
            if prev in room.inside and stand in room.inside and prev not in live:
                live.add(prev)
                queue.append(prev)
    return frozenset(room.inside - live)


def move(room: Room, state: State, action: str) -> tuple[State, str]:
    """Apply one move. Returns the new state and what happened: moved/pushed/wall/blocked-*."""
    d = room.offset(action)
    target = state.player + d
    if target not in room.inside:
        return state, "wall"
    if target in state.boxes:
        beyond = target + d
        if beyond not in room.inside:
            return state, "blocked-wall"
        if beyond in state.boxes:
            return state, "blocked-box"
        return State(target, (state.boxes - {target}) | {beyond}), "pushed"
    return State(target, state.boxes), "moved"


class SolverLimit(RuntimeError):
    """The solver explored its state budget without deciding; the level may be solvable or not."""


def solve_state(room: Room, state: State, max_states: int = 1_000_000) -> list[str] | None:
    """Moves of a shortest solution from `state`, or None when none exists (BFS over moves)."""
    if state.boxes <= room.goals:
        return []
    dead = dead_squares(room)
    if state.boxes & dead - room.goals:
        return None
    parents: dict[State, tuple[State, str] | None] = {state: None}
    queue = deque([state])
    while queue:
        current = queue.popleft()
        for action in ACTIONS:
            nxt, what = move(room, current, action)
            if nxt is current or nxt in parents:
                continue
            if what == "pushed" and (nxt.boxes & dead):
                continue
            parents[nxt] = (current, action)
            if nxt.boxes <= room.goals:
                return _path(parents, nxt)
            if len(parents) > max_states:
                raise SolverLimit(f"Sokoban solver gave up after {max_states} states")
            queue.append(nxt)
    return None


def _path(parents: dict[State, tuple[State, str] | None], end: State) -> list[str]:
    moves = []
    link = parents[end]
    while link is not None:
        prev, action = link
        moves.append(action)
        link = parents[prev]
    return moves[::-1]


def solve(xsb: str, max_states: int = 1_000_000) -> list[str] | None:
    """An optimal (fewest moves) solution of an XSB level, or None if it has none."""
    room, state = parse_xsb(xsb)
    return solve_state(room, state, max_states)


def generate(
    seed: int,
    dim: tuple[int, int] = (6, 6),
    boxes: int = 1,
    max_moves: int | None = None,
    min_moves: int = 2,
) -> str:
    """A solvable level by reverse play; the same arguments always give the same level.

    `dim` is (height, width) including the outer walls. The optimal solution has between
    `min_moves` and `max_moves` moves (no upper bound when None); within that range the length is
    drawn uniformly, so a batch of levels spans easy to hard instead of clustering on trivial ones.
    """
    height, width = dim
    if height < 4 or width < 4:
        raise EnvError(f"Sokoban dim must be at least (4, 4) including walls (got {dim})")
    if boxes < 1:
        raise EnvError(f"Sokoban needs at least one box (got boxes={boxes})")
    if (height - 2) * (width - 2) < boxes + 3:
        raise EnvError(f"a {height}x{width} room is too small for {boxes} boxes; use a larger dim")
    if min_moves < 1:
        raise EnvError(f"Sokoban min_moves must be >= 1: a level must not start solved (got {min_moves})")
    if max_moves is not None and max_moves < min_moves:
        raise EnvError(f"Sokoban max_moves must be >= min_moves (got {max_moves} < {min_moves})")
    rng = random.Random(f"leafe-sokoban:{seed}:{height}x{width}:{boxes}")
    for _ in range(500):
        floor = _carve(rng, height, width)
        # Corridor-like rooms leave no room for mistakes or recovery; keep at least half the interior.
        if len(floor) < max(boxes + 3, (height - 2) * (width - 2) // 2):
            continue
        room = Room(height, width, frozenset(range(height * width)) - floor, frozenset(), frozenset(floor))
        room = Room(height, width, room.walls, frozenset(rng.sample(sorted(floor), boxes)), room.inside)
        by_distance: dict[int, list[State]] = {}
        for state, d in _reverse_play(room, limit=200_000).items():
            by_distance.setdefault(d, []).append(state)
        lengths = [d for d in sorted(by_distance) if d >= min_moves and (max_moves is None or d <= max_moves)]
        if not lengths:
            continue
        candidates = by_distance[rng.choice(lengths)]
        return render(room, rng.choice(sorted(candidates, key=lambda s: (s.player, sorted(s.boxes)))))
    raise EnvError(
        f"could not generate a {height}x{width} level with {boxes} boxes solvable in "
        f"{min_moves}..{max_moves} moves (seed {seed}); relax max_moves or enlarge dim"
    )


# Shapes carved at each step of the random walk: a cell, a domino either way, or a 2x2 block.
_BRUSHES = (((0, 0),), ((0, 0),), ((0, 0), (0, 1)), ((0, 0), (1, 0)), ((0, 0), (0, 1), (1, 0), (1, 1)))


def _carve(rng: random.Random, height: int, width: int) -> frozenset[int]:
    """Random-walk room topology: connected floor cells strictly inside the outer wall."""
    r, c = rng.randint(1, height - 2), rng.randint(1, width - 2)
    floor = set()
    direction = rng.choice(list(ACTIONS.values()))
    for _ in range(int(1.5 * (height + width))):
        if rng.random() < 0.35:
            direction = rng.choice(list(ACTIONS.values()))
        for dr, dc in rng.choice(_BRUSHES):
            rr, cc = r + dr, c + dc
            if 1 <= rr <= height - 2 and 1 <= cc <= width - 2:
                floor.add(rr * width + cc)
        r = min(max(r + direction[0], 1), height - 2)
        c = min(max(c + direction[1], 1), width - 2)
    return frozenset(floor)


def _reverse_play(room: Room, limit: int) -> dict[State, int]:
    """Every state that can be pushed to the solved room, with its optimal number of moves.

    Breadth-first over reverse moves from all solved states (boxes on the goals, player anywhere):
    the player steps back and may pull the box in front of it along. A pull is the exact inverse of
    a push, so a state's BFS depth is its optimal forward solution length. Stops after `limit`
    states (larger rooms), keeping the depths found so far, which are still exact.
    """
    solved = [State(p, room.goals) for p in sorted(room.inside - room.goals)]
    depth = {s: 0 for s in solved}
    queue = deque(solved)
    while queue and len(depth) < limit:
        state = queue.popleft()
        for action in ACTIONS:
            d = room.offset(action)
            back = state.player - d
            if back not in room.inside or back in state.boxes:
                continue
            successors = [State(back, state.boxes)]
            if state.player + d in state.boxes:
                successors.append(State(back, (state.boxes - {state.player + d}) | {state.player}))
            for prev in successors:
                if prev not in depth:
                    depth[prev] = depth[state] + 1
                    queue.append(prev)
    return depth


def distance_table(room: Room, limit: int = 2_000_000) -> dict[State, int]:
    """Optimal moves-to-solve of every solvable state of a room; states not in it are dead ends.

    Exact for the small rooms the benchmark uses; raises SolverLimit past `limit` states.
    """
    table = _reverse_play(room, limit)
    if len(table) >= limit:
        raise SolverLimit(f"the distance table of this room exceeds {limit} states")
    return table


def optimal_moves(room: Room, table: dict[State, int], state: State) -> list[str]:
    """Actions that bring `state` one move closer to solved (empty if it is solved or a dead end)."""
    d = table.get(state)
    if d is None or d == 0:
        return []
    return [a for a in ACTIONS if table.get(move(room, state, a)[0]) == d - 1]


def next_push(room: Room, table: dict[State, int], state: State, action: str) -> tuple[str, State] | None:
    """The first push of the optimal line that starts with `action`: its direction and the state
    just before it (where the player stands to push). None if `action` is not optimal."""
    if action not in optimal_moves(room, table, state):
        return None
    # Each optimal move lowers the distance by one and the move that solves is a push, so this ends.
    while (step := move(room, state, action))[1] != "pushed":
        state = step[0]
        action = optimal_moves(room, table, state)[0]
    return action, state


def plan_thought(room: Room, table: dict[State, int], state: State, action: str) -> str:
    """An optimal move voiced with the plan it serves, "push right from (2,1); at (3,1), go up.": the
    next push of the optimal line, the cell it is pushed from, the player's own cell, then the move
    (why this shape: `synthetic.thought`). Any other move is a bare "go X."."""
    plan = next_push(room, table, state, action)
    if plan is None:
        return f"go {action}."
    push, stand = plan
    (r, c), (pr, pc) = room.coords(stand.player), room.coords(state.player)
    return f"push {push} from ({r},{c}); at ({pr},{pc}), go {action}."


def read_collection(path: str) -> list[str]:
    """Levels of an XSB collection file: blank lines separate levels; ';' comments and
    'Key: value' metadata lines are skipped. Every level is validated."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise EnvError(f"cannot read Sokoban levels from {path}: {exc.strerror}") from exc
    levels, rows = [], []
    for line in text.splitlines() + [""]:
        if line.lstrip().startswith(";") or ":" in line:
            continue
        if line.strip():
            rows.append(line)
        elif rows:
            levels.append("\n".join(rows))
            rows = []
    for i, level in enumerate(levels):
        try:
            parse_xsb(level)
        except EnvError as exc:
            raise EnvError(f"level {i} of {path}: {exc}") from None
    if not levels:
        raise EnvError(f"{path} holds no Sokoban level")
    return levels


def parse_direction(action: str) -> str | None:
    """The one direction named in `action` (case-insensitive, text around it allowed), else None."""
    words = {w.strip(".,:;!?'\"()[]<>*`") for w in action.lower().split()}
    found = {w for w in words if w in ACTIONS}
    return found.pop() if len(found) == 1 else None


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
        self, max_steps: int = 15, dim: tuple[int, int] = (6, 6), boxes: int = 1, levels: str | None = None
    ):
        """`levels`: an XSB collection file to take tasks from instead of generating them."""
        if max_steps < 1:
            raise EnvError(f"Sokoban max_steps must be >= 1 (got {max_steps})")
        self.max_steps = max_steps
        self.dim = (int(dim[0]), int(dim[1]))
        self.boxes = boxes
        self.levels = levels
        self.instruction = INSTRUCTION
        self._room: Room | None = None
        self._state: State | None = None
        self._steps = 0
        self._done = False
        self._table: dict[State, int] | None = None  # the level's distance table, for feedback

    # -- tasks ---------------------------------------------------------------------------------
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
    def from_xsb(cls, text: str, max_steps: int = 15) -> "SokobanEnv":
        """An env already reset to the given level."""
        env = cls(max_steps=max_steps)
        env.reset(Task(task_id="xsb", env=cls.name, spec={"xsb": text}))
        return env

    def expert_actions(self, task: Task) -> list[str] | None:
        return solve(task.spec["xsb"])

    def oracle_reflection(self, task: Task, actions: Sequence[str]) -> str:
        # The bootstrap's reflection examples are written by the same functions, so an oracle
        # reflection reads exactly like the ones the embedded agent was taught to write.
        from leafe.synthetic import NO_MISTAKE, Expert, first_mistake, oracle_experience, reflection_reply

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
        # "go X." here taught the plan agent to stop planning (Early Experience, BENCHMARKS.md).
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
        room, state = self._require_started()
        if self._done:
            raise RuntimeError("step() after the episode ended; call reset() first")
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
        self._done = success or self._steps >= self.max_steps
        if success:
            feedback += " All boxes are on goals: solved!"
        elif self._done:
            feedback += f" No moves left ({self.max_steps} used): the level was not solved."
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
            f"you ({'%d,%d' % room.coords(state.player)}); boxes {where(state.boxes)}; goals {where(room.goals)}; "
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

    def _require_started(self) -> tuple[Room, State]:
        if self._room is None or self._state is None:
            raise RuntimeError("the Sokoban env has no level yet; call reset(task) first")
        return self._room, self._state
