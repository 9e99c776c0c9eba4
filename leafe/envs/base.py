"""The environment contract every leafe env implements, and the shared rollback-by-replay fallback.

An env is a multi-turn text environment: `reset(task)` gives the first observation, `step(action)`
gives the next one with reward and termination. Actions are free text; an action the env cannot
parse is an ordinary step whose observation says so, never an exception, because a model's malformed
reply is part of the trajectory we learn from. The one exception a step may raise about itself is
`EnvFault`: the env's own machinery failed (the code judge's sandbox), so the step has no outcome.

Rollback (LEAFE stage 1) needs the env put back into its state at an earlier step. Envs whose state
is cheap to copy implement `snapshot`/`restore`; every env gets `replay`, which resets and re-plays
the action prefix, checking each replayed observation against the hash recorded the first time so a
non-deterministic env fails loudly instead of silently branching from the wrong state.

Each env also says where its data comes from (`Env.data_status`): `leafe envs` lists it, and making
the env without its data raises the same line as the error.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from leafe.errors import LeafeError
from leafe.prompts import parse_action


@dataclass(frozen=True)
class Task:
    """One problem instance: what `reset` needs to start an episode. `spec` is env-specific JSON."""

    task_id: str
    env: str
    spec: dict[str, Any]


@dataclass
class StepResult:
    observation: str
    reward: float
    done: bool
    success: bool
    info: dict[str, Any] = field(default_factory=dict)


class EnvError(LeafeError, ValueError):
    """Bad env input (a malformed level, an unknown task field): the message names the fix."""


@dataclass(frozen=True)
class DataStatus:
    """Whether an env's data is where its parameters lead, as `Env.data_status` reports it.

    `where` is the path it resolved (or what the env runs on, for an env that needs no files);
    `fix` is one line saying where to get the data: `leafe envs` prints it, and making the env
    without its data raises it as the `EnvError`, so the two never differ. Empty when found.
    """

    found: bool
    where: str
    fix: str = ""

    def require(self) -> DataStatus:
        """This status, or the `EnvError` whose message is `fix` when the data is missing."""
        if not self.found:
            raise EnvError(self.fix)
        return self


class EnvFault(Exception):
    """A step failed in the env's own machinery (a sandbox that could not start, a simulator's process),
    not through the agent's action: it has no observation and no reward, and the env is left as it
    was before the step. The rollout records the episode as faulted and every stage runs it again or
    leaves it out (`leafe.rollout`); `hint` says what to do when it keeps happening."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class ReplayDivergence(LeafeError, RuntimeError):
    """Replaying a recorded action prefix did not reproduce the recorded observations."""


def observation_hash(observation: str) -> str:
    """A short stable digest of an observation, recorded per step so replays can be verified."""
    return hashlib.sha256(observation.encode("utf-8")).hexdigest()[:16]


class Env(ABC):
    """Base class of every environment. Subclasses set `name`; leafe's own register with `@register`, any
    other package through a `leafe.envs` entry point (`leafe.envs.registry`)."""

    name: ClassVar[str] = ""
    #: True when `snapshot`/`restore` copy the full state; otherwise rollback replays.
    supports_snapshot: ClassVar[bool] = False
    #: True when `oracle_reflection` can grade an attempt exactly (a solver knows the level).
    has_oracle_reflection: ClassVar[bool] = False
    #: A parameter that picks among data sets, and its choices: `leafe envs` reports each choice's
    #: `data_status` unless the user set the parameter (the code env's `dataset`).
    data_choices: ClassVar[tuple[str, tuple[str, ...]] | None] = None

    #: The task instruction q shown to the agent; set by `reset`.
    instruction: str = ""

    @classmethod
    def data_status(cls, **params: Any) -> DataStatus:
        """Where the data for an env made with `params` is, and where to get it when it is missing:
        the one place per env that knows where its data comes from. Checks files and packages, never
        loads them. Envs that read data override it with their parameters as keywords (same defaults
        as `__init__`, any other parameter ignored) and call `.require()` on it when constructed."""
        return DataStatus(True, "nothing needed")

    @abstractmethod
    def reset(self, task: Task) -> str:
        """Start an episode of `task`; returns the first observation and sets `self.instruction`."""

    @abstractmethod
    def step(self, action: str) -> StepResult:
        """Apply one agent action (free text) and return what the agent observes next; `EnvFault`
        when the env's machinery, not the action, failed (then the env is as it was). A step outside
        an episode is refused (`check_running`)."""

    def check_running(self, *, started: bool = True, ended: bool = False, what: str = "task") -> None:
        """Refuse to act outside an episode, with the one message each case has everywhere: before the
        first `reset` (`started` false: the env has no `what` yet, the level, problem or game that
        `reset` loads) and after the episode ended (`ended`). `step` calls it first; `snapshot` and
        the like call it with `started` alone. A RuntimeError: the caller's mistake, not the agent's."""
        if not started:
            raise RuntimeError(f"the {self.name or type(self).__name__} env has no {what} yet; call reset(task) first")
        if ended:
            raise RuntimeError("step() after the episode ended; call reset() first")

    @abstractmethod
    def make_tasks(self, n: int, seed: int) -> list[Task]:
        """`n` tasks from consecutive seeds starting at `seed` (deterministic)."""

    def parse_action(self, reply: str) -> str:
        """The action in a model's reply: its 'Action:' line (prompts.parse_action). Envs whose
        actions span lines (a whole program) override this."""
        return parse_action(reply)

    def submit(self, reply: str) -> Callable[[], tuple[str, StepResult]]:
        """Start acting on a model's reply; the returned function waits for (action, result).

        An env in this process acts at once. An env on a worker (`workers.RemoteEnv`) only sends the
        reply, so the rollout engine can submit a whole batch before it waits for any of it.
        """
        action = self.parse_action(reply)
        result = self.step(action)
        return lambda: (action, result)

    def expert_actions(self, task: Task) -> list[str] | None:
        """A successful action sequence for `task` when the env has an expert (solver, gold path)."""
        return None

    def expert_thought(self, action: str) -> str:
        """The thought written before an expert action in demonstrations (Early Experience)."""
        return f"next, {action}."

    def admissible_actions(self) -> list[str] | None:
        """The actions the env accepts in its current state, where it can list them (ALFWorld's
        admissible commands); None where it cannot. Early Experience draws its alternatives from
        this list, as its paper does (App. B), and samples them from the policy where it is None."""
        return None

    def oracle_reflection(self, task: Task, actions: Sequence[str]) -> str:
        """What a perfect reflector would answer after `actions` (the reflection reply format): the
        first step after which the task was lost and what to do there, or "Step: none". A diagnostic
        for stage 1 (`reflector: oracle`), never part of LEAFE itself."""
        raise EnvError(f"env {self.name!r} has no oracle to reflect with; use reflector: policy")

    def snapshot(self) -> Any:
        raise NotImplementedError(f"env {self.name!r} cannot copy its state; roll back with replay()")

    def restore(self, state: Any) -> None:
        raise NotImplementedError(f"env {self.name!r} cannot copy its state; roll back with replay()")


def replay(env: Env, task: Task, actions: Sequence[str], observation_hashes: Sequence[str]) -> str:
    """Reset `env` to `task` and re-apply `actions`, verifying every observation against its hash.

    `observation_hashes[0]` is the hash of the reset observation and `observation_hashes[i + 1]` the
    hash after `actions[i]`, so `len(observation_hashes) == len(actions) + 1`. Returns the last
    observation; raises `ReplayDivergence` naming the first step that differs.
    """
    if len(observation_hashes) != len(actions) + 1:
        raise ValueError(
            f"replay needs one observation hash per action plus the reset observation "
            f"(got {len(observation_hashes)} hashes for {len(actions)} actions)"
        )
    observation = env.reset(task)
    _check_replayed(env, task, 0, None, observation, observation_hashes[0])
    for i, action in enumerate(actions):
        observation = env.step(action).observation
        _check_replayed(env, task, i + 1, action, observation, observation_hashes[i + 1])
    return observation


def _check_replayed(env: Env, task: Task, index: int, action: str | None, observation: str, expected: str) -> None:
    got = observation_hash(observation)
    if got == expected:
        return
    where = "the reset observation" if action is None else f"step {index - 1} (action {action!r})"
    raise ReplayDivergence(
        f"replay of task {task.task_id!r} on env {env.name!r} diverged at {where}: observation hash "
        f"{got} != recorded {expected}. The env is not deterministic under reset+replay; give it "
        f"snapshot()/restore() or make reset deterministic for a task."
    )
