"""Envs by name: `make("sokoban", max_steps=15)`, for leafe's own envs and for any installed package's.

leafe's own envs are the modules of `_BUILTIN_MODULES`, each registering its class with `@register`
when imported: adding one to leafe is its module plus its line in that list. Any other package adds
an env without touching leafe through an entry point in group `leafe.envs` whose name is the env's
name and whose value is its `Env` subclass (`numberline = "mypkg.numberline:NumberLineEnv"` under
`[project.entry-points."leafe.envs"]`, docs/environments.md): `leafe envs`, every `--env` and the
Ray workers of `--workers` (same interpreter, same installed packages) find it.

Plugins load lazily: `names()` reads only the installed packages' metadata, and a plugin's module is
imported the first time its env is looked up. A plugin that cannot load (its import fails, its
value is not an Env subclass) is a one-line `EnvError` naming it and its error when used, and a
`broken` row of `leafe envs`; it never hides the other envs. Built-ins win a name clash: a plugin
that takes a built-in's name is ignored, and `notes(name)` (printed by `leafe envs`, warned once per
process that makes the env) says so, as it says when a plugin's class calls itself by another name.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from leafe.envs.base import DataStatus, Env, EnvError

log = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Env]] = {}

#: What constructs envs by name: `make` itself, or a worker pool's `make` (leafe.scale.workers).
EnvMaker = Callable[..., Env]

#: The entry-point group through which installed packages add envs.
ENTRY_POINT_GROUP = "leafe.envs"

# Modules imported on first lookup; an env whose optional dependency is missing must still import
# (it fails on construction with an install hint), so listing names never needs extras.
_BUILTIN_MODULES = (
    "leafe.envs.sokoban", "leafe.envs.code", "leafe.envs.scienceworld", "leafe.envs.textworld", "leafe.envs.alfworld",
    "leafe.envs.webshop", "leafe.envs.openenv", "leafe.envs.gym",
)


def register(cls: type[Env]) -> type[Env]:
    """Register a built-in env under `cls.name` (the decorator of each module of `_BUILTIN_MODULES`);
    in a script, it registers an env for that process only. A name held by another class is refused,
    and built-ins are registered first, so they win over a class registered from outside leafe."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a non-empty `name` to be registered")
    if not _is_builtin(cls):
        _load_builtins()
    held = _REGISTRY.get(cls.name)
    if held is not None and _qualified(held) != _qualified(cls):  # the same class again is a module reload
        raise TypeError(f"env name {cls.name!r} of {_qualified(cls)} is taken by {_qualified(held)}; "
                        "give it another name")
    _REGISTRY[cls.name] = cls
    return cls


def _is_builtin(cls: type) -> bool:
    return any(cls.__module__ == m or cls.__module__.startswith(m + ".") for m in _BUILTIN_MODULES)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


# -- plugins: envs of other packages, through entry points ----------------------------------------

@dataclass
class _Plugin:
    """One `leafe.envs` entry point; its class, or why it is broken, once loaded."""

    entry: EntryPoint
    cls: type[Env] | None = None
    error: str | None = None

    @property
    def origin(self) -> str:
        """What messages call the plugin: "mypkg.numberline:NumberLineEnv (from mypkg 0.1)"."""
        dist = self.entry.dist
        return self.entry.value + (f" (from {dist.name} {dist.version})" if dist is not None else "")

    def load(self) -> type[Env] | None:
        """The plugin's Env subclass, imported once; None when broken (then `error` says why)."""
        if self.cls is None and self.error is None:
            try:
                value = self.entry.load()
            except Exception as exc:  # noqa: BLE001 (whatever a package's import raises, the plugin is broken)
                self.error = f"{type(exc).__name__}: {exc}"
            else:
                if not (inspect.isclass(value) and issubclass(value, Env)):
                    self.error = f"TypeError: {self.entry.value} is {value!r}, not a subclass of leafe.envs.Env"
                elif inspect.isabstract(value):
                    missing = ", ".join(sorted(value.__abstractmethods__))
                    self.error = f"TypeError: {value.__name__} does not implement {missing}"
                else:
                    self.cls = value
        return self.cls


@cache
def _discovered() -> tuple[dict[str, _Plugin], tuple[tuple[str, str], ...]]:
    """The plugins by env name (read from the installed packages' metadata, nothing imported), and
    (name, line) for each entry point left out because an earlier package on the path gives that name
    (the first wins, as for imports). Read once per process; `forget_plugins` reads them again."""
    plugins: dict[str, _Plugin] = {}
    ignored: list[tuple[str, str]] = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        plugin = _Plugin(entry)
        if entry.name in plugins:
            ignored.append((entry.name, f"plugin {entry.name} = {plugin.origin} is ignored: "
                                        f"{plugins[entry.name].origin} gives an env of that name first"))
        else:
            plugins[entry.name] = plugin
    return plugins, tuple(ignored)


def forget_plugins() -> None:
    """Read the installed entry points again at the next lookup: for a package installed (or a folder
    put on `sys.path`) while this process runs."""
    _discovered.cache_clear()
    _warned.clear()


def _plugins() -> dict[str, _Plugin]:
    """The plugins by env name, less those a built-in shadows."""
    _load_builtins()
    return {name: plugin for name, plugin in _discovered()[0].items() if name not in _REGISTRY}


def broken(name: str) -> str | None:
    """Why env `name`, a plugin, cannot load, in one line: "broken plugin ORIGIN: ERROR; ..." (its
    import failed, its value is no Env subclass); None for an env that loads. Imports the plugin."""
    plugin = _plugins().get(name)
    if plugin is None or plugin.load() is not None:
        return None
    text = f"broken plugin {plugin.origin}: {plugin.error}; fix or uninstall that package"
    return " ".join(text.split())  # an error's message may span lines (a SyntaxError's)


def notes(name: str) -> list[str]:
    """One line for each thing to know about how env `name` is registered: a plugin of that name that
    the built-in shadows, a second package giving the name, a plugin class whose own `name` is not its
    entry point's. `leafe envs` prints them, and a run that uses the env warns them once. Imports the
    plugin."""
    _load_builtins()
    found, ignored = _discovered()
    lines = [line for clash, line in ignored if clash == name]
    plugin = found.get(name)
    if plugin is not None and name in _REGISTRY:
        lines.insert(0, f"plugin {name} = {plugin.origin} is ignored: a built-in env has this name; "
                        "rename its entry point")
    elif plugin is not None and (cls := plugin.load()) is not None and cls.name != name:
        lines.insert(0, f"plugin {name} = {plugin.origin}: its class names itself {cls.name!r}, but "
                        f"its entry point makes it env {name!r}; set `name = {name!r}` on the class")
    return lines


#: The envs whose `notes` this process warned of (once each, when a run first makes the env).
_warned: set[str] = set()


def _warn_once(name: str) -> None:
    if name not in _warned:
        _warned.add(name)
        for line in notes(name):
            log.warning("warning: %s", line)


def names() -> list[str]:
    """Every env name: the built-ins' and the installed plugins', broken ones included (listing them
    imports no plugin)."""
    _load_builtins()
    return sorted({*_REGISTRY, *_plugins()})


def env_class(name: str) -> type[Env]:
    """The Env subclass of env `name`: a built-in, or an installed plugin (imported at its first lookup)."""
    _load_builtins()
    if name in _REGISTRY:
        cls = _REGISTRY[name]
    elif name in _plugins():
        problem = broken(name)
        if problem is not None:
            raise EnvError(f"env {name!r} is a {problem}")
        cls = _plugins()[name].cls
    else:
        raise EnvError(f"unknown env {name!r}; known envs: {', '.join(names())}")
    return cls


def make(name: str, **params: Any) -> Env:
    """Construct a registered env; unknown parameters are an error naming the accepted ones."""
    cls = env_class(name)
    _check_params(name, cls.__init__, params)
    _warn_once(name)
    return cls(**params)


#: Env parameters that name a file or directory of the user's data, checked before anything runs.
PATH_PARAMS = ("levels", "games", "data_dir")


def check_params(name: str, params: dict[str, Any]) -> None:
    """What can be checked of an env without building it (a dry run): its name, its parameters' names,
    that its data is found (the `data_status` line as the error otherwise), and that the data paths
    it is given exist."""
    cls = env_class(name)
    _check_params(name, cls.__init__, params)
    _warn_once(name)
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
