"""Solving Sokoban exactly: a BFS solver, and the distance table of a room (optimal moves-to-solve of
every solvable state, by reverse play), which the env's feedback, the oracle and the generator share.
"""

from __future__ import annotations

from collections import deque

from leafe.envs.sokoban.levels import ACTIONS, Room, State, dead_squares, move, parse_xsb


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

