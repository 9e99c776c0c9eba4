"""The configs that ship inside the package, found by name wherever leafe is installed: the study
configs (`leafe run sokoban-demo`) and the accelerate configs (`leafe launch fsdp`).

A pip install has no repository checkout, so the YAML files live here as package data (pyproject's
`[tool.setuptools.package-data]`) and a file's stem is its name. The repository's top-level `configs/`
is a link to this folder, so the paths the docs use (`configs/sokoban-demo.yaml`) keep working in a
clone. This module finds, resolves and describes the configs; loading and checking one is the job of
its reader (`leafe.study.config`, `leafe.scale.launch`). `leafe configs` lists and copies them
(`leafe.cli.configs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leafe.errors import LeafeError

_HERE = Path(__file__).resolve().parent  # a wheel installs unzipped: these are real files accelerate can read

#: kind -> (its folder, the command that takes it by name or path).
KINDS = {"study": (_HERE, "leafe run"), "accelerate": (_HERE / "accelerate", "leafe launch")}

#: What a name may end with and still be a name (`leafe run sokoban-demo.yaml` where no such file is).
_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class BuiltinConfig:
    name: str  # the file's stem: what `leafe run NAME` / `leafe launch NAME` take
    kind: str  # a key of KINDS
    path: Path

    @property
    def command(self) -> str:
        return KINDS[self.kind][1]

    @property
    def description(self) -> str:
        """The config's first comment line: each file opens with one that says what it is for."""
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                return line.lstrip("#").strip()
        return ""


def builtins(kind: str | None = None) -> list[BuiltinConfig]:
    """The built-in configs of `kind` (all kinds when None), sorted by kind and name."""
    chosen = [kind] if kind else list(KINDS)
    return [BuiltinConfig(path.stem, k, path) for k in chosen for path in sorted(KINDS[k][0].glob("*.yaml"))]


def names(kind: str | None = None) -> list[str]:
    return [config.name for config in builtins(kind)]


def find(name: str, kind: str | None = None) -> BuiltinConfig | None:
    """The built-in config called `name` (or `name.yaml`), of `kind` when given; None if there is none."""
    stem = _stem(name)
    return next((config for config in builtins(kind) if config.name == stem), None)


def get(name: str) -> BuiltinConfig:
    """The built-in config called `name`, of any kind; else a LeafeError that lists them all."""
    config = find(name)
    if config is None:
        listed = "; ".join(f"{kind}: {', '.join(names(kind))}" for kind in KINDS)
        raise LeafeError(f"{name!r} is not a built-in config ({listed}); `leafe configs` lists them")
    return config


def resolve(given: str | Path, kind: str) -> Path:
    """The config file that `given` means for a command taking configs of `kind`: a file that exists
    wins; else a built-in name of that kind; else a LeafeError naming the built-ins.

    Something with a directory in it (`./x.yaml`, `configs/x.yaml`) is only ever a path: a user who
    wrote a path meant that file, and gets told it is missing rather than handed another one."""
    path = Path(given)
    if path.is_file():
        return path
    text = str(given)
    if "/" not in text and path.name == text and (config := find(text, kind)):
        return config.path
    command = KINDS[kind][1]
    what = "config" if kind == "study" else f"{kind} config"
    problem = f"{path} is a directory, not a {what} file" if path.is_dir() else f"{what} {given} does not exist"
    hints = []
    if (same := find(path.name, kind)) is not None:  # the repository's `configs/NAME.yaml` outside a clone
        hints.append(f"the built-in {same.name} is `{command} {same.name}`")
    elif (other := find(path.name)) is not None and "/" not in text:  # a name of the other kind
        hints.append(f"{other.name} is a built-in {other.kind} config, for `{other.command} {other.name}`")
    hints.append(f"built-in {kind} configs: {', '.join(names(kind))} (`leafe configs` lists them; "
                 f"`leafe configs cp NAME DEST` copies one to edit)")
    raise LeafeError(f"{problem}; {'; '.join(hints)}")


def _stem(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
