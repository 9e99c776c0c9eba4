"""Backends sample completions for token-id prompts: `hf` (transformers) here; others plug in by name."""

from __future__ import annotations

from leafe.backends.base import Backend, BackendError, BackendStats, Completion, SamplingParams

BACKENDS = ("hf",)


def load_backend(name: str, model: str, **options) -> Backend:
    """Construct a backend by name for the model at `model` (a directory or a .gguf file)."""
    if name == "hf":
        from leafe.backends.hf import HFBackend

        return HFBackend(model, **options)
    raise BackendError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")


__all__ = ["Backend", "BackendError", "BackendStats", "Completion", "SamplingParams", "load_backend"]
