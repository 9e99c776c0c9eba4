"""Sokoban, written from scratch: levels (XSB), an exact solver, a reverse-play generator, the oracle
that grades attempts, and the env. `leafe.envs.make("sokoban")` builds the env."""

from leafe.envs.sokoban.env import INSTRUCTION, SokobanEnv
from leafe.envs.sokoban.generator import generate
from leafe.envs.sokoban.levels import (
    ACTIONS,
    BOX,
    BOX_ON_GOAL,
    FLOOR,
    GOAL,
    PLAYER,
    PLAYER_ON_GOAL,
    WALL,
    Room,
    State,
    dead_squares,
    move,
    parse_direction,
    parse_xsb,
    read_collection,
    render,
)
from leafe.envs.sokoban.solver import (
    SolverLimit,
    distance_table,
    next_push,
    optimal_moves,
    plan_thought,
    solve,
    solve_state,
)

__all__ = [
    "ACTIONS", "BOX", "BOX_ON_GOAL", "FLOOR", "GOAL", "INSTRUCTION", "PLAYER", "PLAYER_ON_GOAL", "WALL", "Room",
    "SokobanEnv", "SolverLimit", "State", "dead_squares", "distance_table", "generate", "move", "next_push",
    "optimal_moves", "parse_direction", "parse_xsb", "plan_thought", "read_collection", "render", "solve",
    "solve_state",
]
