"""A study's configuration: one YAML file -> the settings of every stage `leafe run` executes.

The settings dataclasses of the stage modules (`EvalSettings`, `GRPOSettings`, `ExploreSettings`,
...) stay the one definition of each knob and its default; a config section is just a mapping onto
one of them, checked here (unknown keys, wrong types) before anything runs. What every stage shares
is set once at the top: the environment, the model, and the training tasks.

    name: sokoban-demo
    env: sokoban
    model: embedded            # the base agent `leafe bootstrap` builds and caches; or a model dir
    methods: [base, grpo, leafe, early_experience, ace]
    train: {tasks: 64, task_seed: 5000}
    eval: {tasks: 16, task_seed: 900000, samples: 32}   # env_params: {...} here changes only what eval plays
    grpo: {steps: 8, learning_rate: 1.0e-4}
    leafe: {start: grpo, explore: {budget: 60}, distill: {beta: 1.0}, sft: {learning_rate: 3.0e-4}}
    early_experience: {start: grpo, variant: iwm, tasks: 32, sft: {learning_rate: 3.0e-4}}
    ace: {start: grpo, tasks: 32}
    generation: {backend: vllm, tensor_parallel_size: 1, data_parallel_size: 8}  # every sampling stage
    resources: {gpus: 8, gpu_memory_gb: 80}   # what `leafe run --dry-run` plans for
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from leafe import configs as builtin_configs
from leafe.errors import LeafeError
from leafe.files import read_text
from leafe.methods import registry
from leafe.methods.registry import Method
from leafe.settings import (
    ACESettings,
    DistillSettings,
    EarlyExperienceSettings,
    EvalSettings,
    ExploreSettings,
    GenerationSettings,
    GRPOSettings,
    SamplingSettings,
    SFTSettings,
    TrackingSettings,
    TrainingSettings,
)
from leafe.study.shape import read_shape

#: Where a method starts: the base model, or GRPO's checkpoint. The paper's protocol starts LEAFE,
#: Early Experience and ACE from GRPO's (../shared/LEAFE.md; its ACE rows sit at GRPO's level, which
#: no playbook on the base reaches): started from the base, a baseline is a training stage behind.
Start = Literal["grpo", "base"]
#: `model: embedded` means the base agent that `leafe bootstrap` builds (cached by its config hash).
EMBEDDED = "embedded"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainTasks(_Section):
    """`train:`: the tasks every training stage plays; by default a sampling stage's own."""

    tasks: int = Field(SamplingSettings.tasks, ge=1)
    task_seed: int = SamplingSettings.task_seed


class LeafeSection(_Section):
    #: The checkpoint stage 1 explores with and stage 2 fine-tunes (the paper: GRPO's).
    start: Start = "grpo"
    explore: dict[str, Any] = {}
    distill: dict[str, Any] = {}
    sft: dict[str, Any] = {}


class EarlyExperienceSection(_Section):
    #: The checkpoint that samples the alternatives and that the SFT fine-tunes (the paper: GRPO's).
    start: Start = "grpo"
    variant: str = EarlyExperienceSettings.variant
    tasks: int | None = None
    sft: dict[str, Any] = {}
    settings: dict[str, Any] = {}


class MethodSection(_Section):
    """A method's section that is `start` and its settings' keys: ACE's, and that of a method registered
    beyond the built-in ones (`leafe.methods.registry`), where a settings parameter other than
    `settings` (e.g. `sft`) is a mapping of its own (`StudyConfig.settings_of`)."""

    model_config = ConfigDict(extra="allow")
    start: Start | None = None  # None: the start its registry entry names

    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ACESection(MethodSection):
    """`ace:`: where ACE starts, and every other key an `ACESettings` field (checked by `ace_settings`,
    which names the known ones)."""

    #: The checkpoint that plays the rounds the playbook grows from, and that is evaluated with the
    #: playbook (the paper: GRPO's).
    start: Start = "grpo"


def _registered(name: str) -> str:
    """`name`, when it is a method a study can compare (the registry's); else pydantic's refusal of a
    value outside a Literal, naming the known ones."""
    names = registry.compared_names()
    if name not in names:
        expected = f"{', '.join(map(repr, names[:-1]))} or {names[-1]!r}"
        raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
    return name


class Resources(_Section):
    """The machine a study is planned for (`leafe run --dry-run`; `leafe.study.budget`). Unset: what
    this machine has (its GPUs, or the CPU)."""

    gpus: int | None = Field(None, ge=0)
    gpu_memory_gb: float | None = Field(None, gt=0)
    #: Decode throughput assumed per GPU for a 7B model in bf16 (scaled by size for others), for the
    #: planner's hours; a stated assumption, not a measurement.
    tokens_per_s_per_gpu: float = Field(2500.0, gt=0)


class StudyConfig(_Section):
    #: A top-level key that is not a field below is a registered method's section (`MethodSection`);
    #: any other is refused (`_known_keys`).
    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, MethodSection]

    name: str
    env: str = "sokoban"
    env_params: dict[str, Any] = {}
    model: str = EMBEDDED
    generation: dict[str, Any] = {}
    training: dict[str, Any] = {}
    resources: Resources = Resources()
    #: Stages run side by side, each in its own process with an equal share of the CPU cores: on a
    #: small CPU machine a stage leaves a core idle while its Python steps envs and samples, so two
    #: evaluations side by side end sooner than one after the other (BENCHMARKS.md, "Stages side by
    #: side"). Stages on GPUs take every GPU, so 1 there (`leafe run` refuses more on a machine with a GPU).
    parallel_stages: int = Field(1, ge=1, le=64)
    #: The date a chat template that writes one renders; `leafe run` pins today's in run.json at the
    #: first run of a model whose template reads it, so a resumed run renders the same tokens.
    date_string: str | None = None
    #: Experiment trackers every stage reports to (`leafe.tracking`): tensorboard, trackio, wandb, mlflow.
    #: One tracker run per study, in RUN/tracking; no stage's fingerprint holds it.
    report_to: list[str] | str = []
    #: The methods compared, each a name of the registry's (`leafe.methods.registry.compared`); all by default.
    methods: list[Annotated[str, AfterValidator(_registered)]] = Field(default_factory=registry.compared_names)
    train: TrainTasks = TrainTasks()
    eval: dict[str, Any] = {}
    grpo: dict[str, Any] = {}
    leafe: LeafeSection = LeafeSection()
    early_experience: EarlyExperienceSection = EarlyExperienceSection()
    ace: ACESection = ACESection()

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        """Refuse a top-level key that is neither a field nor a registered method's section, as pydantic
        refuses an unknown key (its error names the key)."""
        if isinstance(data, dict):
            known = set(cls.model_fields) | set(registry.compared_names()) - {registry.BASE}
            for key, value in data.items():
                if key not in known:
                    raise ValidationError.from_exception_data(
                        cls.__name__, [{"type": "extra_forbidden", "loc": (key,), "input": value}])
        return data

    # -- the settings of each stage ------------------------------------------------------------
    def _shared(self) -> dict[str, Any]:
        """What every sampling stage takes from the top level."""
        pinned = {} if self.date_string is None else {"date_string": self.date_string}
        return {"env": self.env, "env_params": self.env_params, **pinned}

    def generation_settings(self) -> GenerationSettings:
        """The engine every sampling stage uses (base evaluation, exploration, Early Experience's
        alternatives, ACE, the evaluations)."""
        return _settings(GenerationSettings, self.generation, "generation")

    def training_settings(self) -> TrainingSettings:
        """How GRPO, distillation and Early Experience's SFT use the machine (processes, sharding)."""
        settings = _settings(TrainingSettings, self.training, "training")
        settings.validate()
        return settings

    def tracking_settings(self) -> TrackingSettings:
        """The trackers the study reports to (`report_to`), each known and installed."""
        names = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        return _settings(TrackingSettings, {"report_to": names}, "report_to")

    def _checkpointing(self) -> dict[str, Any]:
        """A training stage's activation checkpointing when its section does not set it: on for a
        model above training.checkpointing_above parameters (read from its config.json)."""
        shape = None if self.model == EMBEDDED else read_shape(Path(self.model))
        big = shape is not None and shape.params > self.training_settings().checkpointing_above
        return {"activation_checkpointing": True} if big else {}

    def eval_env_params(self) -> dict[str, Any]:
        """The env parameters the evaluations play: the top-level `env_params` with `eval.env_params`
        over them. The held-out tasks of some envs are another split (ALFWorld's valid_unseen), not
        other seeds of the training distribution; every other stage plays the top-level ones."""
        own = self.eval.get("env_params", {})
        if not isinstance(own, dict):
            raise LeafeError(f"eval.env_params must be a mapping of env parameters, e.g. {{split: valid_unseen}} "
                             f"(got {own!r})")
        return {**self.env_params, **own}

    def eval_settings(self) -> EvalSettings:
        # The playbook is ACE's: its evaluation adds it.
        section = {k: v for k, v in self.eval.items() if k != "env_params"}
        return _settings(EvalSettings, section, "eval", **{**self._shared(), "env_params": self.eval_env_params()},
                         playbook=[])

    def grpo_settings(self) -> GRPOSettings:
        return _settings(GRPOSettings, {**self.train.model_dump(), **self._checkpointing(), **self.grpo}, "grpo",
                         **self._shared())

    def explore_settings(self) -> ExploreSettings:
        return _settings(ExploreSettings, {**self.train.model_dump(), **self.leafe.explore}, "leafe.explore",
                         **self._shared(), strategy="leafe")

    def distill_settings(self) -> DistillSettings:
        return _settings(DistillSettings, self.leafe.distill, "leafe.distill")

    def distill_sft(self) -> SFTSettings:
        return _settings(SFTSettings, {**self._checkpointing(), **self.leafe.sft}, "leafe.sft")

    def early_experience_settings(self) -> EarlyExperienceSettings:
        section = self.early_experience
        tasks = {**self.train.model_dump(), **({"tasks": section.tasks} if section.tasks else {})}
        return _settings(EarlyExperienceSettings, {**tasks, **section.settings, "variant": section.variant},
                         "early_experience", **self._shared())

    def early_experience_sft(self) -> SFTSettings:
        sft = _settings(SFTSettings, {**self._checkpointing(), **self.early_experience.sft}, "early_experience.sft")
        self.early_experience_settings().sft_stages(sft)  # IWM's epochs come out of these: refused now, not at the stage
        return sft

    def ace_settings(self) -> ACESettings:
        return _settings(ACESettings, {**self.train.model_dump(), **self.ace.settings()}, "ace",
                         **self._shared())

    def section(self, method: str) -> Any:
        """The config section of compared method `method`: a built-in one as declared above, a
        registered one's `MethodSection` (empty when the config has none)."""
        if method in type(self).model_fields:
            return getattr(self, method)
        return (self.model_extra or {}).get(method) or MethodSection()

    def start_of(self, method: str) -> str | None:
        """Where `method` starts: "base" or "grpo" (GRPO's checkpoint): its section's `start`, else
        its registry entry's; None for the base itself."""
        if method == registry.BASE:
            return None
        default = next(c.start for c in registry.compared() if c.name == method)
        return getattr(self.section(method), "start", None) or default

    def settings_of(self, method: Method) -> dict[str, Any]:
        """The settings `method` runs with in this study, by the name of its parameter. The built-in
        methods' sections keep the shapes configs write (the builders above); a registered method's
        section is read the one generic way (`_registered_settings`)."""
        built_in = {
            "eval": lambda: {"settings": self.eval_settings()},
            "grpo": lambda: {"settings": self.grpo_settings()},
            "explore": lambda: {"settings": self.explore_settings()},
            "distill": lambda: {"settings": self.distill_settings(), "sft": self.distill_sft()},
            "early_experience": lambda: {"settings": self.early_experience_settings(),
                                         "sft": self.early_experience_sft()},
            "ace": lambda: {"settings": self.ace_settings()},
        }
        return built_in[method.name]() if method.name in built_in else self._registered_settings(method)

    def _registered_settings(self, method: Method) -> dict[str, Any]:
        """A registered method's settings from its section: `settings` from its keys, any other
        parameter from the mapping under its name. A sampling method's default tasks are `train:`'s
        and the env is the study's; a training one checkpoints activations as the built-in ones do."""
        section = self.section(method.study).settings()
        built = {}
        for param, cls in method.settings.items():
            where = method.study if param == "settings" else f"{method.study}.{param}"
            keys = ({k: v for k, v in section.items() if k not in method.settings} if param == "settings" else
                    section.get(param, {}))
            if not isinstance(keys, dict):
                raise LeafeError(f"{where} must be a mapping of {cls.__name__} keys (got {keys!r})")
            sampling = issubclass(cls, SamplingSettings)
            defaults = {**(self.train.model_dump() if sampling else {}),
                        **(self._checkpointing() if "activation_checkpointing" in {f.name for f in fields(cls)}
                           else {})}
            built[param] = _settings(cls, {**defaults, **keys}, where, **(self._shared() if sampling else {}))
        return built

    def check(self) -> None:
        """Build every stage's settings once, so a bad key fails before the first stage runs."""
        if "base" not in self.methods:
            raise LeafeError("methods must include base: every method is compared with the model it started from")
        self.eval_settings()
        self.generation_settings()
        self.training_settings()
        self.tracking_settings()
        for method in registry.methods():
            if method.study in self.methods:
                self.settings_of(method)
        processes = self.training_settings().world
        if "grpo" in self.methods and self.grpo_settings().tasks_per_step % processes:
            raise LeafeError(f"grpo.tasks_per_step ({self.grpo_settings().tasks_per_step}) must be a multiple of "
                             f"training.processes ({processes}): every process samples as many tasks")
        if "grpo" not in self.methods and (keys := [f"{m}.start" for m in self.methods if self.start_of(m) == "grpo"]):
            raise LeafeError(f"{' and '.join(keys)} {'is' if len(keys) == 1 else 'are'} grpo but grpo is not in "
                             f"methods; add grpo to methods or set {', '.join(k + ': base' for k in keys)}")
        if self.parallel_stages > 1 and (self.generation_settings().backend == "vllm" or processes > 1):
            raise LeafeError("parallel_stages > 1 shares CPU cores between stages; a vllm engine or "
                             "training.processes > 1 takes the whole machine, so set parallel_stages: 1")


def _settings(cls: type, section: dict[str, Any], where: str, **fixed: Any) -> Any:
    """`cls(**section, **fixed)`, type-checked, with a one-line error naming the bad key."""
    known = {f.name for f in fields(cls)}
    for key in section:
        if key in fixed:
            raise LeafeError(f"{where}.{key} cannot be set here: it is the study's own (set it at the top level)")
        if key not in known:
            raise LeafeError(f"{where}.{key} is not a setting; known: {', '.join(sorted(known - set(fixed)))}")
    try:
        settings = TypeAdapter(cls).validate_python({**section, **fixed})
    except ValidationError as e:
        key, first = _first_error(e)
        raise LeafeError(f"{where}.{key}: {first['msg']} (got {first.get('input')!r})") from None
    if hasattr(settings, "validate"):
        settings.validate()
    return settings


def _first_error(e: ValidationError) -> tuple[str, dict[str, Any]]:
    """The dotted key and the details of pydantic's first complaint (one line is all we print)."""
    first = e.errors()[0]
    return ".".join(str(p) for p in first["loc"]), first


def apply_override(data: dict[str, Any], item: str) -> None:
    """`key.sub=value` (value parsed as YAML) set into `data`, e.g. `leafe.explore.budget=90`."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise LeafeError(f"--set expects KEY=VALUE, e.g. leafe.start=base (got {item!r})")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    *parents, last = key.strip().split(".")
    node = data
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise LeafeError(f"--set {item}: {name} is not a section")
        node = child
    node[last] = value


def load_config(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    """Parse and check a study config, a path or a built-in name (`leafe configs`), plus `--set
    KEY=VALUE` overrides; every problem is one LeafeError line naming the key."""
    path = builtin_configs.resolve(path, "study")  # a file, or the name of one that ships with leafe
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        raise LeafeError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        raise LeafeError(f"{path} is empty; a study config is a YAML mapping with at least a 'name'")
    if not isinstance(data, dict):
        raise LeafeError(f"{path} holds a YAML {type(data).__name__}, not a mapping; a study config is a mapping "
                         f"with at least a 'name'")
    for item in overrides:
        apply_override(data, item)
    try:
        config = StudyConfig.model_validate(data)
    except ValidationError as e:
        key, first = _first_error(e)
        raise LeafeError(f"{path}: {key}: {first['msg']}") from None
    try:
        config.check()
    except LeafeError as e:
        raise LeafeError(f"{path}: {e}") from None
    return config
