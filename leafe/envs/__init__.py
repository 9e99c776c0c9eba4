"""Multi-turn environments behind one contract (`base.Env`), created by name (`make`)."""

from leafe.envs.base import DataStatus, Env, EnvError, ReplayDivergence, StepResult, Task, observation_hash, replay
from leafe.envs.registry import EnvMaker, check_params, env_class, make, names, register

__all__ = [
    "DataStatus",
    "Env",
    "EnvError",
    "EnvMaker",
    "check_params",
    "ReplayDivergence",
    "StepResult",
    "Task",
    "env_class",
    "make",
    "names",
    "observation_hash",
    "register",
    "replay",
]
