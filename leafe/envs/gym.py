"""Gymnasium: any Gymnasium env, its actions given as text, as a leafe env (`--env gym --env-param id=...`).

Gymnasium (`gymnasium.make(id)`, `reset(seed=...)`, `step(action)`) is the API most RL envs already
have (skyrl-gym models its text envs on it; a text env is a `gymnasium.Env` whose actions are
strings), and it is light to install (numpy and two small packages). We chose it as the second
adapter over verifiers, whose environments run the model themselves (an async rollout that calls an
OpenAI client) rather than taking one action at a time, and whose install pulls an LLM-client stack;
a verifiers environment reaches leafe through OpenEnv instead (`openenv import` wraps verifiers
environments as OpenEnv servers). docs/environments.md has the survey.

- `id`: a registered id, or `module:Name-v0`, which Gymnasium imports first (the module registers
  its env), so an env in your own package needs no change to leafe; `make_kwargs` go to `make`.
- Actions: the agent's action text is the action. In a `Discrete` action space it must name one:
  its index, or one of `action_names` (`left,down,right,up` for FrozenLake); anything else is a step
  whose observation says so, the env not stepped.
- Observations: a string as it is; a dict's `observation_key` field (default: all of its fields);
  anything else as JSON (leafe.envs.openenv.as_text, shared by both adapters).
- Success: the step's `info[success_key]` where the env sets it, else ending (terminated) with
  reward >= `success_reward`. Truncation and `max_steps` end an episode unsolved.

Tasks are seeds: task i is `reset(seed=i)`, so rollback by verified replay works on any env whose
reset the seed determines (every env that draws from `self.np_random` does); one that is not is
found out at the first replay, and `leafe explore` refuses that branch and counts it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from leafe.envs.base import DataStatus, Env, EnvError, StepResult, Task
from leafe.envs.openenv import DEFAULT_INSTRUCTION, as_text, fields_text
from leafe.envs.registry import register

INSTALL_HINT = "pip install 'leafe[gym]'"
PACKAGE_MISSING = f"the gym env needs the gymnasium package: {INSTALL_HINT}"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


@register
class GymEnv(Env):
    """A Gymnasium env with text actions; rollback by verified replay from its seeded reset."""

    name = "gym"

    def __init__(self, id: str = "", make_kwargs: dict[str, Any] | None = None, instruction: str = "",
                 observation_key: str = "", success_key: str = "success", success_reward: float = 1.0,
                 action_names: list[str] | str | None = None, max_steps: int = 30):
        """`id`: the Gymnasium id, or module:Name-v0 to import module first (required). `make_kwargs`:
        keyword arguments for gymnasium.make, a JSON object. `instruction`: the task instruction (empty:
        a generic one). `observation_key`: the field of a dict observation the agent sees (empty: all).
        `success_key`: the info key that says the task is solved, where the env sets it.
        `success_reward`: else a terminating step with at least this reward is a success.
        `action_names`: names of a Discrete space's actions in index order (a list, or comma-separated).
        `max_steps`: steps before leafe ends the episode unsolved."""
        self.data_status(id=id).require()
        if max_steps < 1:
            raise EnvError(f"env 'gym': max_steps must be >= 1 (got {max_steps})")
        if make_kwargs is not None and not isinstance(make_kwargs, dict):
            raise EnvError(f"env 'gym': make_kwargs must be a JSON object such as {{\"size\": 5}} (got {make_kwargs!r})")
        import gymnasium

        try:
            self._env = gymnasium.make(id, **(make_kwargs or {}))
        except (gymnasium.error.Error, ImportError) as error:
            raise EnvError(f"env 'gym': gymnasium cannot make {id!r}: {_one_line(error)}") from None
        except TypeError as error:  # a keyword the env's constructor does not take
            raise EnvError(f"env 'gym': gymnasium cannot make {id!r} with make_kwargs {make_kwargs}: "
                           f"{_one_line(error)}") from None
        self.id, self.instruction_text, self.observation_key = id, instruction, observation_key
        self.success_key, self.success_reward, self.max_steps = success_key, float(success_reward), max_steps
        self.actions = self._discrete_actions(action_names)
        self._steps, self._done = 0, True

    @classmethod
    def data_status(cls, id: str = "", **_: object) -> DataStatus:
        """The env is the Gymnasium package's (or yours through it): installed, and an id given."""
        if importlib.util.find_spec("gymnasium") is None:
            return DataStatus(False, "the gymnasium package is not installed", PACKAGE_MISSING)
        if not id:
            return DataStatus(False, "a Gymnasium env", "env 'gym' needs a Gymnasium id: --env-param id=Name-v0, or "
                                                        "id=mypkg.module:Name-v0 for one your module registers")
        return DataStatus(True, f"gymnasium.make({id!r})")

    def _discrete_actions(self, names: list[str] | str | None) -> dict[str, int] | None:
        """Action text -> action, for a Discrete space (None: the text itself is the action)."""
        import gymnasium

        space = self._env.action_space
        if not isinstance(space, gymnasium.spaces.Discrete):
            if names:
                raise EnvError(f"env 'gym': action_names are for a Discrete action space; {self.id}'s is a "
                               f"{type(space).__name__}")
            return None
        start, n = int(space.start), int(space.n)
        if not names:
            return {str(start + i): start + i for i in range(n)}
        listed = [x.strip() for x in (names.split(",") if isinstance(names, str) else names)]
        if len(listed) != n or len({x.lower() for x in listed}) != n:
            raise EnvError(f"env 'gym': action_names must name each of {self.id}'s {n} actions once, in index order "
                           f"(got {listed})")
        return {name.lower(): start + i for i, name in enumerate(listed)}

    # -- tasks ---------------------------------------------------------------------------------
    def make_tasks(self, n: int, seed: int) -> list[Task]:
        """Seeds seed..seed+n-1, each one `reset(seed=...)` of the env."""
        short = self.id.rsplit(":", 1)[-1].replace("/", "-")
        return [Task(f"{short}-{s}", self.name, {"seed": s}) for s in range(seed, seed + n)]

    # -- episode -------------------------------------------------------------------------------
    def reset(self, task: Task) -> str:
        seed = task.spec.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise EnvError(f"Gymnasium task {task.task_id!r} has no integer seed (its spec: {task.spec})")
        observation, _ = self._env.reset(seed=seed)
        self._steps, self._done = 0, False
        self.instruction = self.instruction_text or DEFAULT_INSTRUCTION
        return self._text(observation)

    def step(self, action: str) -> StepResult:
        if self._done:
            raise RuntimeError("step() outside an episode of the gym env; call reset(task) first")
        self._steps += 1
        chosen: Any = action if self.actions is None else self.actions.get(action.strip().lower())
        if chosen is None:  # not one of a Discrete space's actions: feedback, the env untouched
            observation = f"Invalid action {action!r}: use one of {', '.join(self.actions)}."
            reward, done, success, invalid = 0.0, False, False, True
        else:
            state, reward, terminated, truncated, info = self._env.step(chosen)
            observation, reward, invalid = self._text(state), float(reward), False
            if self.success_key and self.success_key in info:
                success = bool(info[self.success_key])
            else:
                success = bool(terminated) and reward >= self.success_reward
            done = bool(terminated or truncated) or success
        if not done and self._steps >= self.max_steps:
            done = True
            observation += f"\nNo steps left ({self.max_steps} used): the task was not completed."
        self._done = done
        return StepResult(observation, reward, done, success, {"invalid": invalid})

    def _text(self, observation: Any) -> str:
        if not isinstance(observation, dict):
            return as_text(observation)
        if self.observation_key:
            if self.observation_key not in observation:
                raise EnvError(f"the observations of {self.id} have no key {self.observation_key!r} (they have "
                               f"{', '.join(map(str, observation))}): set --env-param observation_key=NAME")
            return as_text(observation[self.observation_key])
        return fields_text(observation)
