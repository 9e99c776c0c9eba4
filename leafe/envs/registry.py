"""Envs by name: `make("sokoban", max_steps=15)`. Adding an env is one module that uses `@register`."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leafe.envs.base import DataStatus, Env, EnvError

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
    that its data is found (the `data_status` line as the error otherwise), and that the data paths
    it is given exist."""
    cls = env_class(name)
    _check_params(name, cls.__init__, params)
    data_status(name, params).require()
    for key in PATH_PARAMS:
        if params.get(key) is not None and not Path(str(params[key])).exists():
            raise EnvError(f"env {name!r}: {key}={params[key]} does not exist; give the path of your data")


def data_status(name: str, params: dict[str, Any] | None = None) -> DataStatus:
    """Where the data of env `name` made with `params` is (`Env.data_status`), without building it."""
    return env_class(name).data_status(**(params or {}))


def data_statuses(name: str, params: dict[str, Any] | None = None) -> list[tuple[str, DataStatus]]:
    """(label, status) of each data set `leafe envs` reports for an env: one, labelled "", or one per
    choice of its `data_choices` parameter ("dataset=mbpp") when `params` does not set it."""
    cls, params = env_class(name), dict(params or {})
    if cls.data_choices is None or cls.data_choices[0] in params:
        return [("", cls.data_status(**params))]
    key, choices = cls.data_choices
    return [(f"{key}={choice}", cls.data_status(**{**params, key: choice})) for choice in choices]


@dataclass(frozen=True)
class Param:
    """One constructor parameter of an env: what `--env-param name=value` sets."""

    name: str
    default: Any  # inspect.Parameter.empty when it has none
    help: str


def parameters(name: str) -> list[Param]:
    """The parameters of env `name`, with the help its `__init__` docstring gives each
    ("`max_steps`: 50, as in ReAct's runs.")."""
    init = env_class(name).__init__
    helps = _param_help(inspect.getdoc(init) or "")
    return [Param(p.name, p.default, helps.get(p.name, ""))
            for p in inspect.signature(init).parameters.values()
            if p.name != "self" and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]


_HELP = re.compile(r"((?:`\w+`,\s*)*`\w+`):\s*(.*?)(?=\s(?:`\w+`,\s*)*`\w+`:|$)")


def _param_help(doc: str) -> dict[str, str]:
    """Each "`name`: text" (or "`a`, `b`: text") of a docstring, up to the next such name."""
    helps: dict[str, str] = {}
    for names, text in _HELP.findall(" ".join(doc.split())):
        for param in re.findall(r"`(\w+)`", names):
            helps.setdefault(param, text.strip())
    return helps


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
