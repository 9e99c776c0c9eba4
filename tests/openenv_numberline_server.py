"""A small text env served by OpenEnv's own server classes (openenv-core's `create_app`), for the tests.

    python tests/openenv_numberline_server.py

A number line: the agent starts at a point and must reach the goal, `right` (or `left`) one step at a
time; `look` changes nothing. The reset's seed draws the start and the goal (the goal 2 or 3 to the
right), so a reset with the same seed is the same episode, as rollback by replay needs. A reset with
`noisy=True` adds a random number to the first observation, as a server that ignores the seed does.
The action `crash` makes the env raise and `sleep` makes it answer after 2 s: failures of the server.
Actions longer than 20 characters fail the Action schema, and a `noisy` that is not a boolean the reset's
options (validation errors).

It binds a free loopback port, prints `PORT <n>` once it listens, and serves until terminated.
"""

from __future__ import annotations

import random
import socket
import sys
import time
from typing import Any

import uvicorn
from openenv.core.env_server.http_server import create_fastapi_app
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State
from pydantic import BaseModel, Field, StrictBool


class NumberLineAction(Action):
    message: str = Field(..., max_length=20, description="left, right or look")


class NumberLineObservation(Observation):
    text: str = Field(default="", description="where the agent is and where the goal is")


class ResetOptions(BaseModel):
    noisy: StrictBool = False


class NumberLineEnvironment(Environment):
    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self):
        super().__init__()
        self._state = State(step_count=0)
        self.position = self.goal = 0

    def reset(self, seed: int | None = None, episode_id: str | None = None, noisy: bool = False,
              **kwargs: Any) -> NumberLineObservation:
        noisy = ResetOptions(noisy=noisy).noisy  # a reset option of the wrong type fails validation
        rng = random.Random(seed)
        self.position = rng.randint(0, 5)
        self.goal = self.position + rng.choice([2, 3])
        self._state = State(episode_id=episode_id, step_count=0)
        text = f"You are at {self.position}. The goal is at {self.goal}. Actions: left, right, look."
        if noisy:
            text += f" (weather: {random.random():.6f})"
        return NumberLineObservation(text=text, reward=0.0, done=False)

    def step(self, action: NumberLineAction) -> NumberLineObservation:  # type: ignore[override]
        self._state.step_count += 1
        move = action.message.strip().lower()
        if move == "crash":
            raise RuntimeError("the number line broke")
        if move == "sleep":
            time.sleep(2)
        if move in ("left", "right"):
            self.position += 1 if move == "right" else -1
        elif move != "look":
            return NumberLineObservation(text=f"Unknown action {move!r}: use left, right or look.", reward=0.0)
        if self.position == self.goal:
            return NumberLineObservation(text=f"You reached the goal at {self.goal}.", reward=1.0, done=True)
        return NumberLineObservation(text=f"You are at {self.position}. The goal is at {self.goal}.", reward=0.0)

    @property
    def state(self) -> State:
        return self._state


def main() -> None:
    app = create_fastapi_app(NumberLineEnvironment, NumberLineAction, NumberLineObservation, max_concurrent_envs=64)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
