"""Backends sample completions for token-id prompts: `hf` (transformers, in process), `vllm` (vLLM's
engine, in process) and `openai` (any OpenAI-compatible completions server); others plug in by name."""

from __future__ import annotations

import os

from leafe.backends.base import Backend, BackendError, BackendStats, Completion, PromptError, SamplingParams
from leafe.settings import BACKENDS, GenerationSettings


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


def backend_for(model: str, settings: GenerationSettings, **engine: object) -> Backend:
    """The backend a stage's `GenerationSettings` name, for `model`; each engine takes its own options
    (`engine`: more of vLLM's, e.g. GRPO's enable_sleep_mode)."""
    settings.validate()
    if settings.backend == "openai":  # the servers hold the model; `model` only lends its tokenizer
        return load_backend("openai", model, base_url=settings.base_urls, max_concurrency=settings.max_concurrency,
                            api_key=os.environ.get(settings.api_key_env) or None,
                            timeout_s=settings.request_timeout_s, retries=settings.request_retries)
    if settings.backend == "vllm":  # vLLM places the model itself (GPUs when there are)
        options = dict(dtype=settings.dtype, trust_remote_code=settings.trust_remote_code,
                       tensor_parallel_size=settings.tensor_parallel_size,
                       gpu_memory_utilization=settings.gpu_memory_utilization, max_model_len=settings.max_model_len,
                       enable_prefix_caching=settings.enable_prefix_caching, enforce_eager=settings.enforce_eager,
                       kv_cache_gb=settings.kv_cache_gb, **engine)
        if settings.data_parallel_size > 1:
            from leafe.backends.replicas import VLLMReplicas

            return VLLMReplicas(model, replicas=settings.data_parallel_size, **options)
        return load_backend("vllm", model, **options)
    return load_backend(settings.backend, model, device=settings.device, dtype=settings.dtype,
                        trust_remote_code=settings.trust_remote_code, gguf_file=settings.gguf_file)


__all__ = ["Backend", "BackendError", "BackendStats", "Completion", "PromptError", "SamplingParams", "backend_for",
           "load_backend"]
