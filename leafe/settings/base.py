"""What the settings classes are built from: `knob` (a field with its help), `Settings` (the root
whose `validate` each class extends), and the bases several methods share, so a shared knob is defined
once: `SamplingSettings` under every stage that samples, `OptimizerSettings` and `LoRASettings` under
every method that trains (SFT, GRPO).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any

from leafe.errors import LeafeError


def knob(default: Any = MISSING, help: str = "", *, factory: Any = None, flags: tuple[str, ...] = (),
         cli: bool = True) -> Any:
    """A settings field with its help text. `flags`: the CLI's option declarations when the field's
    dashed name is not the whole story (an alias kept for older command lines, a --x/--no-y pair);
    `cli=False`: set by the program or the study config, never on the command line."""
    metadata = {"help": help, "flags": flags, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _at_least(settings: Any, minimum: int, *names: str) -> None:
    for name in names:
        if getattr(settings, name) < minimum:
            raise LeafeError(f"--{name.replace('_', '-')} must be >= {minimum} (got {getattr(settings, name)})")


class Settings:
    """The root of the settings classes that methods combine. `validate` refuses a bad value in one
    line (a LeafeError naming it); each class checks its own knobs after `super().validate()`, so a
    class with several bases (GRPO: sampling, optimizer, LoRA) checks every base's."""

    def validate(self) -> None:
        pass


# -- what every sampling stage has ---------------------------------------------------------------

@dataclass
class SamplingSettings(Settings):
    """Which tasks of which env, and how replies are sampled: shared by every stage that samples."""

    env: str = knob("sokoban", "Environment name; `leafe envs` lists them (built-in and installed).")
    env_params: dict[str, Any] = knob(factory=dict, help="Env parameter key=value (repeatable), e.g. max_steps=20.",
                                      flags=("--env-param",))
    tasks: int = knob(64, "Number of tasks (consecutive seeds).")
    task_seed: int = knob(5000, "Seed of the first task.")
    temperature: float = knob(1.0, "Sampling temperature (0: greedy).")
    top_p: float = knob(1.0, "Nucleus sampling: sample from the smallest set of tokens with this probability.")
    max_new_tokens: int = knob(64, "Token limit of one agent turn.")
    seed: int = knob(0, "Seed of sampling (and of training, where the stage trains).")
    date_string: str | None = knob(None, "The date a chat template that writes one renders (Llama 3.1), e.g. "
                                   "'26 Jul 2024'; default: the day it runs (`leafe run` pins one per run).")

    def validate(self) -> None:
        super().validate()
        _at_least(self, 1, "tasks", "max_new_tokens")
        if self.temperature < 0:
            raise LeafeError(f"--temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise LeafeError(f"--top-p must be in (0, 1] (got {self.top_p})")


# -- what every training method has --------------------------------------------------------------

@dataclass
class OptimizerSettings(Settings):
    """AdamW and the backward pass, as every method that trains (SFT, GRPO) sets them."""

    learning_rate: float = knob(1e-5, "Learning rate.", flags=("--learning-rate", "--lr"))
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    max_grad_norm: float = knob(1.0, "Gradient clipping norm.")
    # Off by default, unlike TRL: it saves memory on large models at about a third more compute, which
    # small models on a CPU do not need (a study turns it on above training.checkpointing_above).
    activation_checkpointing: bool = knob(False, "Recompute activations in the backward pass (less memory, about "
                                                 "a third more compute).")

    def validate(self) -> None:
        super().validate()
        if self.learning_rate <= 0:
            raise LeafeError(f"--learning-rate must be > 0 (got {self.learning_rate})")


@dataclass
class LoRASettings(Settings):
    """LoRA adapters in place of full fine-tuning, as every method that trains (SFT, GRPO) sets them."""

    lora: bool = knob(False, "Train LoRA adapters on every linear layer; the model is saved with them merged in "
                             "(GRPO: and the adapters alone in OUT/adapter; its KL reference is the model with "
                             "them off, no copy).")
    lora_r: int = knob(16, "LoRA rank.")
    lora_alpha: int = knob(32, "LoRA alpha.")
