"""Generated levels, built the way gym-sokoban builds them: carve a room, put the boxes on their goals,
then play backwards (the player *pulls* boxes), so every level is solvable by construction and its
optimal solution length is known.
"""

from __future__ import annotations

import random

from leafe.envs.base import EnvError
from leafe.envs.sokoban.levels import ACTIONS, Room, State, render
from leafe.envs.sokoban.solver import _reverse_play


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

