"""Command-line options generated from the settings dataclasses (`leafe.settings`), the way TRL's
parser builds its options from its configs: a field's dashed name (or its `flags`), type, default and
help become the option, so the command line cannot drift from the library's defaults.

    @app.command("eval")
    @settings_command
    def eval_cmd(settings: EvalSettings, backend: GenerationSettings, model: ModelOpt, out: OutOpt): ...

The command gets one option per field of every dataclass parameter; the function receives the built,
validated instances. A field that two of its dataclasses share (`seed` of distillation and of its
SFT) is one option that sets both.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Optional, Union

import typer

from leafe.errors import LeafeError


def parse_env_params(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are JSON when they parse as JSON (numbers, lists), else strings."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LeafeError(f"--env-param expects key=value (got {item!r}), e.g. --env-param max_steps=20")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def parse_ks(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LeafeError(f"--k expects comma-separated integers such as 1,4,16 (got {text!r})") from None


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a settings class that the command line sets."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _option(f: dataclasses.Field, kind: Any) -> tuple[Any, Any, Callable[[Any], Any]]:
    """(annotation, default, convert) of the option for field `f`: how it is typed on the command
    line and how its value becomes the field's."""
    help_text = f.metadata.get("help", "")
    flags = f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",)
    default = default_of(f)
    if f.name == "env_params":
        return Annotated[list[str], typer.Option(*flags, help=help_text)], [], parse_env_params
    if f.name == "ks":
        return Annotated[str | None, typer.Option(*flags, help=help_text)], None, parse_ks
    if kind is bool and len(flags) == 1 and "/" not in flags[0]:
        flags = (f"{flags[0]}/--no-{flags[0][2:]}",)
    optional = typing.get_origin(kind) in (Union, types.UnionType) and type(None) in typing.get_args(kind)
    if optional:
        (inner,) = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = Optional[inner]  # noqa: UP045 (typer reads typing.Optional on every Python we support)
    return Annotated[kind, typer.Option(*flags, help=help_text)], default, lambda value: value


def settings_command(fn: Callable) -> Callable:
    """Give `fn` one option per field of each of its dataclass-typed parameters (see the module doc)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    own = inspect.signature(fn).parameters
    built = {name: hints[name] for name in own if dataclasses.is_dataclass(hints.get(name))}
    options: dict[str, tuple[Any, Any, Callable]] = {}
    owners: dict[str, list[str]] = {}
    for param, cls in built.items():
        types_of = typing.get_type_hints(cls)
        for f in cli_fields(cls):
            option = _option(f, types_of[f.name])
            if f.name in options and options[f.name][1] != option[1]:
                raise TypeError(f"{fn.__name__}: {f.name} has two defaults ({options[f.name][1]!r}, {option[1]!r})")
            options.setdefault(f.name, option)
            owners.setdefault(f.name, []).append(param)

    params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=p.default, annotation=hints[name])
              for name, p in own.items() if name not in built]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
               for name, (annotation, default, _) in options.items()]

    def command(**kwargs: Any) -> Any:
        values = {name: options[name][2](kwargs.pop(name)) for name in options}
        for param, cls in built.items():
            settings = cls(**{name: values[name] for name in values if param in owners[name]})
            if hasattr(settings, "validate"):
                settings.validate()
            kwargs[param] = settings
        return fn(**kwargs)

    command.__name__, command.__doc__ = fn.__name__, fn.__doc__
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.settings_classes = dict(built)  # type: ignore[attr-defined]  (the defaults test reads it)
    return command
