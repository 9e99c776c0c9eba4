"""Envs by name: `make("sokoban", max_steps=15)`. Adding an env is one module that uses `@register`."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leafe.envs.base import Env, EnvError

_REGISTRY: dict[str, type[Env]] = {}

#: What constructs envs by name: `make` itself, or a worker pool's `make` (leafe.scale.workers).
EnvMaker = Callable[..., Env]

# Modules imported on first lookup; an env whose optional dependency is missing must still import
# (it fails on construction with an install hint), so listing names never needs extras.
_BUILTIN_MODULES = (
    "leafe.envs.sokoban", "leafe.envs.code", "leafe.envs.scienceworld", "leafe.envs.textworld", "leafe.envs.alfworld",
    "leafe.envs.webshop",
)


def register(cls: type[Env]) -> type[Env]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a non-empty `name` to be registered")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def env_class(name: str) -> type[Env]:
    _load_builtins()
    if name not in _REGISTRY:
        raise EnvError(f"unknown env {name!r}; known envs: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make(name: str, **params: Any) -> Env:
    """Construct a registered env; unknown parameters are an error naming the accepted ones."""
    cls = env_class(name)
    _check_params(name, cls.__init__, params)
    return cls(**params)


#: Env parameters that name a file or directory of the user's data, checked before anything runs.
PATH_PARAMS = ("levels", "games", "data_dir")


def check_params(name: str, params: dict[str, Any]) -> None:
    """What can be checked of an env without building it (a dry run): its name, its parameters' names,
    and that the data paths it is given exist."""
    cls = env_class(name)
    _check_params(name, cls.__init__, params)
    for key in PATH_PARAMS:
        if params.get(key) is not None and not Path(str(params[key])).exists():
            raise EnvError(f"env {name!r}: {key}={params[key]} does not exist; give the path of your data")
    if name == "code":
        from leafe.envs.code_datasets import check_dataset

        data_dir = params.get("data_dir")
        check_dataset(str(params.get("dataset", "leafe")), str(data_dir) if data_dir is not None else None)


def _check_params(name: str, init: Callable[..., Any], params: dict[str, Any]) -> None:
    signature = inspect.signature(init)
    accepted = [p for p in signature.parameters if p != "self"]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise EnvError(
            f"env {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(accepted) or 'none'}"
        )
