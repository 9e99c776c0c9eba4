"""The backend contract: token ids in, token ids out.

A backend samples completions for token-id prompts. It never sees text it must re-encode: the
conversation layer (`chat.py`) owns tokenization, and the ids a backend returns are appended to the
history untouched, so the ids the model generated are the ids training sees.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from leafe.errors import LeafeError


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    max_new_tokens: int = 64
    seed: int = 0
    logprobs: bool = False
    #: Generation stops after any of these ids (the stop id is kept in the output).
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1 (got {self.n})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    #: "stop" when a stop token ended it (the last id), "length" when max_new_tokens did.
    finish_reason: str
    #: Log-probability of each sampled id under the distribution it was drawn from (temperature,
    #: top-k and top-p applied), when asked; None for an id the engine reported none for.
    logprobs: list[float | None] | None = None


@dataclass
class BackendStats:
    """Work counters, cumulative since the backend was made (or since `reset()`)."""

    calls: int = 0
    prompt_tokens: int = 0  # tokens of all prompts passed in
    prefill_tokens: int = 0  # prompt tokens actually run through the model (after reuse)
    generated_tokens: int = 0

    def reset(self) -> None:
        self.calls = self.prompt_tokens = self.prefill_tokens = self.generated_tokens = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "prefill_tokens": self.prefill_tokens,
            "generated_tokens": self.generated_tokens,
        }


def request_seed(seed: int, call: int, index: int) -> int:
    """The seed of one request, for backends that sample each prompt as its own request (vllm,
    openai): one seed for all would make the n episodes of a task (separate requests with the same
    first prompt) sample the very same replies."""
    return zlib.crc32(f"{seed}/{call}/{index}".encode()) & 0x7FFFFFFF


class BackendError(LeafeError, RuntimeError):
    """A model could not be loaded or run; the message names the cause and the fix."""


class PromptError(BackendError, ValueError):
    """A prompt the model cannot take: empty, or too long for its context with the completion's limit.
    Also a ValueError, as bad arguments are, which callers of `generate` may already catch."""


@contextmanager
def loading_model(model: Any):
    """Turn what a broken model directory raises (a truncated or corrupt weights file, a missing
    config, an unknown architecture) into one BackendError naming the directory."""
    try:
        yield
    except BackendError:
        raise
    except Exception as exc:  # noqa: BLE001 (safetensors, transformers and torch each raise their own kinds)
        if not _is_load_error(exc):
            raise
        detail = " ".join(str(exc).split())[:300]
        raise BackendError(f"could not load the model at {model}: {type(exc).__name__}: {detail}; "
                           f"is it a complete model directory?") from exc


def _is_load_error(exc: BaseException) -> bool:
    return isinstance(exc, (OSError, ValueError, KeyError, EOFError)) or type(exc).__name__ in (
        "SafetensorError", "HeaderTooLarge", "UnpicklingError")


class Backend(ABC):
    """Samples completions for token-id prompts. `tokenizer` is the model's own."""

    tokenizer: Any
    #: Longest sequence (prompt + completion) the model accepts.
    max_context: int
    #: The ids the model's generation_config.json stops on; the chat layer adds them to every turn's
    #: stop ids, so each backend stops on the same set (`leafe.chat.generation_stop_ids`).
    stop_ids: tuple[int, ...] = ()
    stats: BackendStats

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Completion]]:
        """`sampling.n` completions for each prompt, in prompt order; `check_prompts` first."""

    def check_prompts(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> None:
        """Refuse, before any of them runs, a prompt the model cannot take: an empty one, or one whose
        tokens and `sampling.max_new_tokens` exceed `max_context`. Every backend's `generate` calls it,
        so all of them refuse the same prompts with the same message."""
        for p in prompts:
            if not p:
                raise PromptError("cannot generate from an empty prompt")
            if len(p) + sampling.max_new_tokens > self.max_context:
                raise PromptError(f"prompt of {len(p)} tokens + max_new_tokens {sampling.max_new_tokens} exceeds "
                                  f"the model's context of {self.max_context} tokens")

    def close(self) -> None:
        """Release resources (servers, worker processes, caches)."""

    def sleep(self) -> None:
        """Hand accelerator memory to a trainer sharing it (vLLM's sleep mode); no-op by default."""

    def wake_up(self) -> None:
        """Take the memory back after `sleep`; no-op by default."""


def release_memory() -> None:
    """Collect what a closed backend left and hand cached GPU memory back to the device, so the next
    model (a training stage's, another engine's) finds it free."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")  # only when something loaded it: a CPU study never needs it here
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
