"""Data parallelism for the vllm backend: N replicas of the model, each a vLLM engine in its own
process on its own GPUs, with every call's prompts split between them.

vLLM's `LLM` holds one engine (itself sharded over `tensor_parallel_size` GPUs); a second engine on
other GPUs must live in another process that sees only those GPUs (`CUDA_VISIBLE_DEVICES`), which is
how vLLM's own offline data-parallel example runs too. So with `data_parallel_size: 4` and
`tensor_parallel_size: 2` on 8 GPUs, replica r sees GPUs 2r and 2r+1.

What is sampled does not depend on the replica count: the seeds of a call's requests are the ones a
single engine would give them (`request_seed` of the call and the prompt's position), and each replica
samples its share with those seeds. Prompts go to replicas in contiguous runs, so the episodes of one
task (neighbours in a call, sharing their opening prompt) and the branches of one node meet in one
prefix cache.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
from collections.abc import Sequence
from typing import Any

from leafe.backends.base import Backend, BackendError, BackendStats, Completion, SamplingParams, request_seed
from leafe.chat import generation_stop_ids

#: Seconds a replica may take to load its model before the backend gives up on it.
START_TIMEOUT_S = 1800


def replica_devices(replicas: int, per_replica: int, visible: Sequence[str]) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES of each replica (None on a machine without GPUs: CPU engines)."""
    if not visible:
        return [None] * replicas
    need = replicas * per_replica
    if len(visible) < need:
        raise BackendError(f"data_parallel_size {replicas} x tensor_parallel_size {per_replica} needs {need} GPUs, "
                           f"{len(visible)} are visible; lower generation.data_parallel_size")
    return [",".join(visible[r * per_replica:(r + 1) * per_replica]) for r in range(replicas)]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [d.strip() for d in named.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _serve(conn: Any, model: str, devices: str | None, options: dict[str, Any]) -> None:
    """A replica: load the model on `devices`, then answer generate (and load-weights) requests until
    told to stop."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices  # before vLLM or torch looks at the GPUs
    try:
        from leafe.backends.vllm import VLLMBackend

        backend = VLLMBackend(model, **options)
    except Exception as exc:  # noqa: BLE001 (whatever stops the engine goes back to the parent as one line)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", backend.max_context))
    while (message := conn.recv()) is not None:
        before = backend.stats.prefill_tokens
        try:
            if message[0] == "load":
                backend.load_weights(message[1])
                conn.send(("ok",))
                continue
            _, prompts, sampling, seeds = message
            out = backend.generate_seeded(prompts, sampling, seeds)
        except Exception as exc:  # noqa: BLE001
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            continue
        conn.send(("ok", out, backend.stats.prefill_tokens - before))
    backend.close()


class VLLMReplicas(Backend):
    """`replicas` vLLM engines of `model`, `tensor_parallel_size` GPUs each; `options` are
    `VLLMBackend`'s."""

    def __init__(self, model: str, *, replicas: int, tensor_parallel_size: int = 1, trust_remote_code: bool = False,
                 **options: Any):
        from transformers import AutoTokenizer

        devices = replica_devices(replicas, tensor_parallel_size, visible_gpus())
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        except OSError as exc:
            raise BackendError(f"could not load the tokenizer of {model}: {exc}") from exc
        context = multiprocessing.get_context("spawn")  # a forked CUDA context is unusable
        options = {**options, "tensor_parallel_size": tensor_parallel_size, "trust_remote_code": trust_remote_code}
        self._replicas = []
        for where in devices:
            parent, child = context.Pipe()
            # Not a daemon: vLLM starts its engine core as a child process, which daemons may not have;
            # `close` (also at exit) stops the replicas instead.
            process = context.Process(target=_serve, args=(child, model, where, options))
            process.start()
            self._replicas.append((process, parent))
        atexit.register(self.close)
        contexts = [self._receive(r, START_TIMEOUT_S, "loading the model") for r in range(replicas)]
        self.max_context = int(min(c[1] for c in contexts))
        self.stop_ids = generation_stop_ids(model)
        self.name = f"vllm:{model} x{replicas}"
        self.stats = BackendStats()
        self._calls = 0

    def _receive(self, replica: int, timeout_s: float | None, doing: str) -> tuple:
        process, conn = self._replicas[replica]
        if not conn.poll(timeout_s):
            self.close()
            raise BackendError(f"vLLM replica {replica} did not answer {doing} within {timeout_s} s")
        try:
            message = conn.recv()
        except EOFError:
            self.close()
            raise BackendError(f"vLLM replica {replica} died {doing} (exit code {process.exitcode})") from None
        if message[0] == "error":
            self.close()
            raise BackendError(f"vLLM replica {replica} failed {doing}: {message[1]}")
        return message

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Completion]]:
        if not prompts:
            return []
        self.check_prompts(prompts, sampling)
        self._calls += 1
        self.stats.calls += 1
        seeds = [request_seed(sampling.seed, self._calls, i) for i in range(len(prompts))]
        prompts = [[int(t) for t in p] for p in prompts]
        share = -(-len(prompts) // len(self._replicas))  # contiguous runs (see the module doc)
        busy = []
        for r, (_, conn) in enumerate(self._replicas):
            lo, hi = r * share, min(len(prompts), (r + 1) * share)
            if lo < hi:
                conn.send(("generate", prompts[lo:hi], sampling, seeds[lo:hi]))
                busy.append(r)
        results: list[list[Completion]] = []
        for r in busy:
            _, out, prefill = self._receive(r, None, "generating")
            results.extend(out)
            self.stats.prefill_tokens += prefill
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        self.stats.generated_tokens += sum(len(c.token_ids) for row in results for c in row)
        return results

    def load_weights(self, model_dir: str) -> None:
        """Every replica takes the weights of `model_dir` (see `VLLMBackend.load_weights`)."""
        for _, conn in self._replicas:
            conn.send(("load", str(model_dir)))
        for r in range(len(self._replicas)):
            self._receive(r, None, "loading new weights")

    def close(self) -> None:
        replicas, self._replicas = getattr(self, "_replicas", []), []
        for process, conn in replicas:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for process, _ in replicas:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)
