"""Every knob of every stage, defined once: its name, type, default and help.

A settings dataclass per method. What several methods share is a base of its own, so a shared knob is
still defined once: `SamplingSettings` (env, tasks, sampling) under every stage that samples,
`OptimizerSettings` and `LoRASettings` under every method that trains (SFT, GRPO). The CLI builds its
options from these fields (`leafe.cli.options`), the study config maps its sections onto them
(`leafe.study.config`), and fingerprints read them (`leafe.fingerprint`), so a default or a help text
changes here and nowhere else.

- `base`: `knob`, the root `Settings` and the shared bases (sampling, optimizer, LoRA);
- `resources`: where a stage runs and reports (generation engine, training processes, env workers,
  trackers);
- `methods`: each method's settings (evaluation, exploration, distillation, SFT, GRPO, Early
  Experience, ACE);
- `base_agent`: the embedded base agent's build and its cache digest.

Import the names from `leafe.settings`; the modules are how the file is laid out, not an API.

This package imports no torch: `leafe --help` and `leafe run --dry-run` read it without loading a model
library.

A class-level declaration keeps recorded work valid (see `leafe.fingerprint`): `speed_only`, the
fields that change speed or memory, never results, which fingerprints leave out.
"""

from leafe.settings.base import LoRASettings, OptimizerSettings, SamplingSettings, Settings, knob
from leafe.settings.base_agent import GENERATOR, BootstrapConfig
from leafe.settings.methods import (
    EE_ALTERNATIVES,
    EE_DEFAULT_ALTERNATIVES,
    REFLECTORS,
    STRATEGIES,
    VARIANTS,
    ACESettings,
    DistillSettings,
    EarlyExperienceSettings,
    EvalSettings,
    ExploreSettings,
    GRPOSettings,
    SFTSettings,
)
from leafe.settings.resources import (
    BACKENDS,
    PRECISIONS,
    SHARDINGS,
    GenerationSettings,
    TrackingSettings,
    TrainingSettings,
    WorkerSettings,
)

__all__ = [
    "BACKENDS", "EE_ALTERNATIVES", "EE_DEFAULT_ALTERNATIVES", "GENERATOR", "PRECISIONS",
    "REFLECTORS", "SHARDINGS", "STRATEGIES", "VARIANTS", "ACESettings", "BootstrapConfig", "DistillSettings",
    "EarlyExperienceSettings", "EvalSettings", "ExploreSettings", "GRPOSettings", "GenerationSettings", "LoRASettings",
    "OptimizerSettings", "SFTSettings", "SamplingSettings", "Settings", "TrackingSettings", "TrainingSettings",
    "WorkerSettings", "knob",
]
