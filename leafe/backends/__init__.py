"""Backends sample completions for token-id prompts: `hf` (transformers, in process), `vllm` (vLLM's
engine, in process) and `openai` (any OpenAI-compatible completions server); others plug in by name."""

from __future__ import annotations

from leafe.backends.base import Backend, BackendError, BackendStats, Completion, SamplingParams

BACKENDS = ("hf", "vllm", "openai")


def load_backend(name: str, model: str, **options) -> Backend:
    """Construct a backend by name for the model at `model` (a directory or a .gguf file)."""
    if name == "hf":
        from leafe.backends.hf import HFBackend

        return HFBackend(model, **options)
    if name == "vllm":
        from leafe.backends.vllm import VLLMBackend

        return VLLMBackend(model, **options)
    if name == "openai":
        from leafe.backends.openai import OpenAIBackend

        if not options.get("base_url"):
            raise BackendError("the openai backend needs the server's address: --base-url http://HOST:PORT/v1")
        return OpenAIBackend(model, **options)
    raise BackendError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")


__all__ = ["Backend", "BackendError", "BackendStats", "Completion", "SamplingParams", "load_backend"]
