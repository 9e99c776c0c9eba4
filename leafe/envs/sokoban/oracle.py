"""The Sokoban oracle: exact knowledge of a level (optimal moves from every state), the first
irreversible mistake of an attempt, and the experience that names it and the move to make instead.

It answers `--reflector oracle` (a diagnostic of stage 1) and writes the embedded base agent's
reflection examples (`leafe.base_agent.synthetic`), so an oracle reflection reads exactly like the
ones the agent was taught to write.
"""

from __future__ import annotations

from dataclasses import dataclass

from leafe.envs.base import Task
from leafe.envs.sokoban.levels import ACTIONS, Room, State, move, parse_direction, parse_xsb
from leafe.envs.sokoban.solver import distance_table, optimal_moves, plan_thought


@dataclass
class Expert:
    """Exact knowledge of one level: optimal moves-to-solve of every state."""

    room: Room
    start: State
    table: dict[State, int]
    max_steps: int
    plans: bool = False  # voice optimal moves with the plan behind them (see `thought`)

    @classmethod
    def of(cls, task: Task, max_steps: int, plans: bool = False) -> Expert:
        room, start = parse_xsb(task.spec["xsb"])
        return cls(room, start, distance_table(room), max_steps, plans)

    def optimal(self, state: State) -> list[str]:
        """Actions that bring `state` one move closer to solved (empty if it is a dead end)."""
        return optimal_moves(self.room, self.table, state)

    def lost(self, state: State, steps_left: int) -> bool:
        """True when `state` cannot be solved in the moves left."""
        d = self.table.get(state)
        return d is None or d > steps_left

    def states(self, actions: list[str]) -> list[State]:
        """States s_0..s_T visited by playing `actions` (directions; anything else leaves the state)."""
        out = [self.start]
        for a in actions:
            out.append(move(self.room, out[-1], a)[0] if a in ACTIONS else out[-1])
        return out


def first_mistake(expert: Expert, actions: list[str]) -> int | None:
    """The first step t after which the level can no longer be solved in the moves left, or None.

    With a step limit, "irreversible" includes wasting moves: the state after a_t may be solvable
    in principle but not within max_steps - t - 1 moves.
    """
    states = expert.states([_direction(a) for a in actions])
    for t in range(len(actions)):
        left = expert.max_steps - t
        if not expert.lost(states[t], left) and expert.lost(states[t + 1], left - 1):
            return t
    return None


def _direction(action: str) -> str:
    return parse_direction(action) or ""


def oracle_experience(expert: Expert, actions: list[str], step: int) -> str:
    """What went wrong at `step` of an attempt and what to do there instead, in plain words."""
    states = expert.states([_direction(a) for a in actions])
    return describe_mistake(expert, states[step], step, _direction(actions[step]))


def describe_mistake(expert: Expert, state: State, step: int, wrong: str) -> str:
    """The experience for having played `wrong` (a direction, or "" for an invalid action) at
    `step` from `state`: the damage done, then the expert's move there."""
    fixes = expert.optimal(state)
    # "go X" is also how the expert's thought starts, so following the experience is a plain copy.
    fix = f"Instead, go {fixes[0]}." if fixes else "Instead, approach the box from the other side."
    if not wrong:
        return f"At step {step}, the action was invalid and wasted a move. {fix}"
    after, what = move(expert.room, state, wrong)
    if what == "pushed" and after not in expert.table:
        return f"At step {step}, pushing the box {wrong} got it stuck for good. {fix}"
    return f"At step {step}, moving {wrong} wasted moves and left too few to finish. {fix}"


def reflection_reply(step: int | None, experience: str) -> str:
    return f"Step: {'none' if step is None else step}\nExperience: {experience}"


NO_MISTAKE = "Nothing is lost yet; keep going."


def thought(expert: Expert, state: State, action: str) -> str:
    """The short thought before a move: what the expert has in mind, in the same words whether the
    move is wise or not.

    Plain ("go left." / "go left to push the box."): the direction is the first content token, so the
    decision is made there and the Action line copies it. With `expert.plans`, an optimal move also
    says the plan it serves, "push right from (2,1); at (3,1), go up.": the next push of the optimal
    line and the cell it is made from, then the player's own cell copied from the board's coordinates
    line, then the move. Each token is then a small step from the ones before it (the move compares
    two cells written side by side) instead of the whole plan in one token; mistakes stay a bare
    "go X." (docs/experiment-log.md, "Plan thoughts": the first build that plays clearly better than a random mover).
    """
    if expert.plans:
        return plan_thought(expert.room, expert.table, state, action)
    _, what = move(expert.room, state, action)
    return f"go {action} to push the box." if what == "pushed" else f"go {action}."
