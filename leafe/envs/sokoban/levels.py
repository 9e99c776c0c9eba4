"""Sokoban levels: the XSB format, the room and state types, moves, rendering, collections.

Levels use the standard XSB text format (`#` wall, space floor, `.` goal, `$` box, `*` box on goal, `@`
player, `+` player on goal; `-` and `_` are accepted as floor). A room is what never changes (walls,
goals, inside cells); a state is what moves (the player cell and the box set).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from leafe.envs.base import EnvError
from leafe.files import read_text

ACTIONS: dict[str, tuple[int, int]] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}

WALL, FLOOR, GOAL, BOX, BOX_ON_GOAL, PLAYER, PLAYER_ON_GOAL = "#", " ", ".", "$", "*", "@", "+"
_FLOOR_ALIASES = {" ", "-", "_"}
_KNOWN = {WALL, GOAL, BOX, BOX_ON_GOAL, PLAYER, PLAYER_ON_GOAL} | _FLOOR_ALIASES


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



def read_collection(path: str) -> list[str]:
    """Levels of an XSB collection file: blank lines separate levels; ';' comments and
    'Key: value' metadata lines are skipped. Every level is validated."""
    try:
        text = read_text(path)
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

