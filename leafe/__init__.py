"""leafe: train LLM agents with LEAFE (reflect on feedback, roll back, distil the corrections).

The public API. Every method takes a `Job` and its settings and returns a `MethodResult`
(`leafe.method`); the methods are the registry's (`leafe.methods.registry`), each imported on first
use, so `import leafe` stays light.

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
from leafe.methods import registry
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

#: Besides the methods (the registry's functions): the study, by the module that holds each.
_STUDY = {"Study": "leafe.study.study", "load_config": "leafe.study.config"}


def __getattr__(name: str) -> Any:
    """A method's function or the study's, imported when first used (most load torch)."""
    method = next((m for m in registry.methods() if m.function == name), None)
    if method is not None:
        return method.load()
    if name in _STUDY:
        return getattr(import_module(_STUDY[name]), name)
    raise AttributeError(f"module 'leafe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *(m.function for m in registry.methods())})


__all__ = [
    "ACESettings", "Backend", "BootstrapConfig", "DistillSettings", "EarlyExperienceSettings", "Env", "Episode",
    "EvalSettings", "ExploreSettings", "GRPOSettings", "Job", "LeafeError", "MethodResult", "SFTSettings",
    "SamplingParams", "Step", "Task", "__version__", "load_backend", "make",
    *(m.function for m in registry.methods()), *_STUDY,
]
