"""leafe: train LLM agents with LEAFE (reflect on feedback, roll back, distil the corrections).

The public API. Every method takes a `Job` and its settings and returns a `MethodResult`
(`leafe.method`); the functions that load torch are imported on first use, so `import leafe` stays
light.

    from leafe import EvalSettings, Job, evaluate, load_backend
    backend = load_backend("hf", "path/to/model")
    result = evaluate(Job(model="path/to/model", out="runs/eval", backend=backend), EvalSettings(tasks=10))
    result.data["pass_at_k"]
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from leafe.backends import Backend, SamplingParams, load_backend
from leafe.envs import Env, Task, make
from leafe.episode import Episode, Step
from leafe.errors import LeafeError
from leafe.method import Job, MethodResult
from leafe.settings import (
    ACESettings,
    BootstrapConfig,
    DistillSettings,
    EarlyExperienceSettings,
    EvalSettings,
    ExploreSettings,
    GRPOSettings,
    SFTSettings,
)

try:
    __version__ = version("leafe")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

#: The methods, by the module that holds each (imported when first used).
_METHODS = {
    "evaluate": "leafe.methods.evaluate",
    "explore": "leafe.methods.explore",
    "distill": "leafe.methods.distill",
    "train_grpo": "leafe.methods.grpo",
    "train_early_experience": "leafe.methods.early_experience",
    "train_ace": "leafe.methods.ace",
    "bootstrap": "leafe.base_agent.bootstrap",
    "Study": "leafe.study.plan",
    "load_config": "leafe.study.config",
}


def __getattr__(name: str) -> Any:
    if name in _METHODS:
        return getattr(import_module(_METHODS[name]), name)
    raise AttributeError(f"module 'leafe' has no attribute {name!r}")


__all__ = [
    "ACESettings", "Backend", "BootstrapConfig", "DistillSettings", "EarlyExperienceSettings", "Env", "Episode",
    "EvalSettings", "ExploreSettings", "GRPOSettings", "Job", "LeafeError", "MethodResult", "SFTSettings",
    "SamplingParams", "Step", "Task", "__version__", "load_backend", "make", *_METHODS,
]
