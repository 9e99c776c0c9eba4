"""The methods, one entry each: everything the rest of leafe knows about a method, in one table.

A method is one function of a `Job` and its settings (`leafe.method`). Its entry says where that
function lives, the settings it takes, what its `Job` must carry, whether it samples, trains or can
run over several processes, its `leafe` command, and where a study runs it. Whatever lists the
methods reads this table rather than naming them again:

- the public API (`leafe.<function>`, imported on first use: most methods load torch);
- a study: the methods a config may list, their config sections and starts (`leafe.study.config`),
  their stages and fingerprints (`leafe.study.stages`), how each stage calls its method
  (`leafe.study.runner`), the labels of the report;
- the launcher: which methods run over `training.processes` and how a rank calls one
  (`leafe.scale.stage`);
- the command scaffold of `leafe eval`, `leafe train grpo`, ... (`leafe.cli.methods`).

Adding a method is one module (its function and settings dataclass) plus one entry: a method of
leafe's goes in `_BUILT_IN`, any other is `register`ed (docs/architecture.md, "Adding a method").
This module imports no method: it must stay as light as `import leafe`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from leafe.errors import LeafeError
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

#: What a method's Job and call can carry, by the names of `Method.needs`:
NEEDS = {
    "model": "a model to sample from (`Job.model`: a model directory, or a .gguf file for the hf engine)",
    "checkpoint": "a starting checkpoint it builds on (`Job.model`: a model directory)",
    "engine": "a running sampling engine (`Job.backend`), shut down with `Job.release`",
    "generation": "the engine's settings (`generation=`), to start an engine of its own",
    "envs": "envs to play (`Job.envs`)",
    "trees": "exploration trees to read (`Job.inputs`: the trees.jsonl of the stage before it)",
}
#: How a method runs over several processes (`training.processes > 1`): the whole method, launched
#: by the study (`leafe.scale.stage.launch`), or only the SFT it trains its rows with (`Job.train_sft`).
LAUNCHES = ("method", "sft")
#: The model every study method starts from. It is compared too (evaluated first) but runs no method.
BASE = "base"


@dataclass(frozen=True)
class Method:
    name: str  # MethodResult.method and its figures' stage name (`leafe.tracking`): "grpo"
    function: str  # its public name, `leafe.<function>`: "train_grpo"
    module: str  # the module that holds the function, imported when it is first called
    #: Its settings parameters after the Job, by name, in the order the function takes them.
    settings: dict[str, type] = field(hash=False)
    needs: frozenset[str] = frozenset()  # names of NEEDS
    trains: bool = False  # writes new weights (a model directory)
    launch: str | None = None  # one of LAUNCHES; None: one process
    command: str | None = None  # its `leafe` command: "train grpo"
    # -- where a study runs it: the method it compares (None: not a stage of one), ------------
    #: that method's name (its config section, stage prefix and results.json key): "leafe";
    study: str | None = None
    stage: str = "train"  # this method's stage under it, `<study>.<stage>`: "leafe.explore"
    title: str = ""  # the stage's title; `{start}` and `{section.<key>}` (its config section's) filled in
    label: str = ""  # the compared method's name in tables and the report (from its first stage)
    start: str = "grpo"  # where it starts unless its section's `start` says: "base", or GRPO's checkpoint
    #: The key of its `settings` parameter in a stage's fingerprint (default: its name; its other
    #: parameters under their own names).
    fingerprint: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(NEEDS)
        if unknown or (self.launch is not None and self.launch not in LAUNCHES):
            raise LeafeError(f"method {self.name}: needs {sorted(unknown)} unknown (known: {', '.join(NEEDS)}) or "
                             f"launch {self.launch!r} not one of {LAUNCHES}")

    @property
    def samples(self) -> bool:
        """It generates with a model (an engine it is given or one it starts)."""
        return bool(self.needs & {"engine", "generation"})

    def load(self) -> Callable[..., Any]:
        """The method's function (its module imported now)."""
        return getattr(import_module(self.module), self.function)

    def settings_key(self, parameter: str) -> str:
        """The key of a settings parameter in the fingerprint of the stage that runs this method."""
        return (self.fingerprint or self.name) if parameter == "settings" else parameter


@dataclass(frozen=True)
class Compared:
    """A method a study compares: its stages (registry methods, in order) before its evaluation."""

    name: str
    label: str
    start: str | None  # its default start; None: the base, which starts from nothing
    stages: tuple[Method, ...] = field(default=())

    def stage_key(self, method: Method) -> str:
        return f"{self.name}.{method.stage}"


_BUILT_IN = (
    Method("eval", "evaluate", "leafe.methods.evaluate", {"settings": EvalSettings},
           frozenset({"model", "engine", "envs"}), command="eval"),
    Method("grpo", "train_grpo", "leafe.methods.grpo", {"settings": GRPOSettings},
           frozenset({"checkpoint", "generation", "envs"}), trains=True, launch="method", command="train grpo",
           study="grpo", title="GRPO", label="GRPO", start=BASE),
    Method("explore", "explore", "leafe.methods.explore", {"settings": ExploreSettings},
           frozenset({"model", "engine", "envs"}), command="explore",
           study="leafe", stage="explore", title="LEAFE explore from {start}", label="LEAFE"),
    Method("distill", "distill", "leafe.methods.distill", {"settings": DistillSettings, "sft": SFTSettings},
           frozenset({"checkpoint", "trees"}), trains=True, launch="method", command="distill",
           study="leafe", stage="distill", title="LEAFE distil"),
    Method("early_experience", "train_early_experience", "leafe.methods.early_experience",
           {"settings": EarlyExperienceSettings, "sft": SFTSettings}, frozenset({"checkpoint", "engine", "envs"}),
           trains=True, launch="sft", command="train early-experience", study="early_experience",
           title="Early Exp. ({section.variant}) from {start}", label="Early Experience", fingerprint="ee"),
    Method("ace", "train_ace", "leafe.methods.ace", {"settings": ACESettings},
           frozenset({"checkpoint", "engine", "envs"}), command="train ace",
           study="ace", title="ACE playbook from {start}", label="ACE"),
    Method("bootstrap", "bootstrap", "leafe.base_agent.bootstrap", {"config": BootstrapConfig}, trains=True,
           command="bootstrap"),
)
_METHODS: dict[str, Method] = {m.name: m for m in _BUILT_IN}


def register(method: Method) -> Method:
    """Add a method (after the built-in ones: a study runs its stages after theirs)."""
    if method.name in _METHODS:
        raise LeafeError(f"a method named {method.name!r} is registered already")
    clash = [m.name for m in _METHODS.values()
             if m.function == method.function or (m.study, m.stage) == (method.study or BASE, method.stage)]
    if clash or method.study == BASE:
        raise LeafeError(f"method {method.name}: its function or its stage is {', '.join(clash) or BASE}'s")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Take a registered method out (a test's toy; a built-in one cannot go)."""
    if name in {m.name for m in _BUILT_IN}:
        raise LeafeError(f"{name} is a built-in method")
    _METHODS.pop(name, None)


def get(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise LeafeError(f"no method named {name!r}; known: {', '.join(_METHODS)}") from None


def methods() -> list[Method]:
    return list(_METHODS.values())


def compared() -> list[Compared]:
    """The methods a study compares, in the order their stages run: the base first, then each
    study method of the table with its stages (its label and start from its first)."""
    stages: dict[str, list[Method]] = {}
    for method in _METHODS.values():
        if method.study is not None:
            stages.setdefault(method.study, []).append(method)
    return [Compared(BASE, "Base", None), *(Compared(name, own[0].label or name, own[0].start, tuple(own))
                                           for name, own in stages.items())]


def compared_names() -> list[str]:
    return [c.name for c in compared()]


def label(name: str) -> str:
    """A compared method's name in tables (its own name when it is not registered)."""
    return next((c.label for c in compared() if c.name == name), name)
