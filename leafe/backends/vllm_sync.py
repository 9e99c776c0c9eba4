"""What vLLM's workers need to take a trainer's new weights: loaded by vLLM itself into each worker
(`worker_extension_cls`), never by leafe's process, so this module imports nothing at leafe's import.

`leafe_reload(path)` reloads the weights in place from a Hugging Face directory (vLLM's
`reload_weights`, which re-runs each layer's post-load processing: a CPU worker repacks its linear
layers, so writing into the parameters directly would leave the packed copies stale). vLLM 0.32's
layerwise reload skips a tied output head (it receives no weights of its own) and keeps its old
packed copy, so a model with tied embeddings has its head tied again and re-processed here:
without it the synced engine still scores every token with the old head (the log-prob gap to the
trainer stays at the unsynced size).

`leafe_update_begin` / `leafe_update_chunk` / `leafe_update_end` take the weights in memory instead
(`VLLMBackend.update_weights`): the same layerwise reload `reload_weights` runs, split over calls
(vLLM's own weight-transfer engines do the same: `initialize_layerwise_reload`, then the model's
`load_weights` once per chunk, each layer processed as soon as all its weights have arrived, then
`finalize_layerwise_reload`). The tensors come as raw bytes: `collective_rpc` sends its arguments to
the engine-core process with vLLM's msgpack encoder, and a tensor among them arrives as
`[dtype, shape, buffer index]` with the buffer dropped (its decoder only rebuilds tensors in typed
messages); bytes arrive whole, but slowly: a chunk is copied some six times on its two hops (driver ->
engine core over zmq, engine core -> workers through vLLM's message queue, pickled), several times
slower than one shared copy (BENCHMARKS.md, "Sharded training"). So by default the data goes through
one shared-memory segment the driver reuses (a chunk's size, `multiprocessing.shared_memory`), and
only names, offsets and shapes go through `collective_rpc`; each worker copies the chunk out of it
before loading (a layer whose weights span two chunks keeps its first part buffered until the rest
arrives, and the segment is reused).
"""

from __future__ import annotations

_SEGMENTS: dict = {}  # this worker's mapping of the driver's shared-memory segment, by name (one at a time)


def _segment(name: str):
    """The driver's shared-memory segment `name` (`multiprocessing.shared_memory`'s name), mapped
    once; an earlier one is let go. Mapped directly rather than through `SharedMemory`, which would
    register it with the resource tracker this process shares with the driver (the driver owns it)."""
    import _posixshmem
    import mmap
    import os

    if name not in _SEGMENTS:
        for old in _SEGMENTS.values():
            try:
                old.close()
            except BufferError:  # a view still alive somewhere: the mapping goes with the process
                pass
        _SEGMENTS.clear()
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        try:
            _SEGMENTS[name] = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
    return _SEGMENTS[name]


class WeightSync:
    """Mixed into vLLM's worker class; called through `LLM.collective_rpc("leafe_reload", ...)` and
    `collective_rpc("leafe_update_*", ...)`."""

    def leafe_reload(self, path: str) -> int:
        self.reload_weights(weights_path=path)
        model = self.model_runner.get_model()
        self._leafe_retie(model)
        return sum(p.numel() for p in model.parameters())

    def leafe_update_begin(self) -> None:
        """Open an in-memory update: every layer's weights go to the meta device until its new
        ones arrive (kernel tensors kept, so the compiled graphs keep pointing at them)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if getattr(self, "_leafe_expected", None) is not None:  # an earlier update died half-way
            self.leafe_update_end()
        model = self.model_runner.get_model()
        self._leafe_expected = {n.replace(".base_layer.", ".") for n, _ in model.named_parameters()}
        self._leafe_loaded: set[str] = set()
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(model)

    def leafe_update_chunk(self, chunk: list, segment: str | None = None) -> int:
        """Load `chunk`, a list of (HF name, dtype name, shape, raw bytes), through the model's own
        `load_weights` (fused q/k/v and gate/up, sharding over tensor-parallel ranks); a layer whose
        weights are now all in is processed (CPU repacking) and copied into its kernel tensors.
        With `segment`, the third item of each entry is (byte offset, byte count) in that shared
        memory segment instead of the bytes."""
        import warnings

        import torch
        from vllm.config import set_current_vllm_config

        weights = []
        for name, dtype, shape, data in chunk:
            kind = getattr(torch, dtype)
            if segment is not None:
                offset, count = data
                if not count:
                    weights.append((name, torch.empty(shape, dtype=kind)))
                    continue
                view = torch.frombuffer(_segment(segment), dtype=torch.uint8, count=count, offset=offset)
                weights.append((name, view.view(kind).view(shape).clone()))  # the driver reuses the segment
                del view
                continue
            if not len(data):
                weights.append((name, torch.empty(shape, dtype=kind)))
                continue
            with warnings.catch_warnings():  # msgpack hands over read-only bytes; the loaders only copy from them
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.frombuffer(data, dtype=torch.uint8)
            weights.append((name, raw.view(kind).view(shape)))
        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config):
            loaded = model.load_weights(weights)
        if loaded is not None:
            self._leafe_loaded.update(loaded)
        return len(weights)

    def leafe_update_end(self) -> list[str]:
        """Close the update: layers still waiting are processed (attention layers always are here),
        ones that received nothing get their old weights back; a tied head is tied again. Returns
        the names of the engine's parameters that received no weights (empty when all did)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.model_config)
        self._leafe_retie(model)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):  # as reload_weights does
            if callable(getattr(self.model_runner, reset, None)):
                getattr(self.model_runner, reset)()
        expected, loaded = self._leafe_expected, getattr(self, "_leafe_loaded", set())
        self._leafe_expected = None
        if expected is None or self.model_config.quantization is not None:
            return []
        return sorted(expected - loaded)

    def _leafe_retie(self, model) -> None:
        head, inner = getattr(model, "lm_head", None), getattr(model, "model", None)
        tied = getattr(self.model_config.hf_config, "tie_word_embeddings", False)
        embed = getattr(inner, "embed_tokens", None)
        if tied and head is not None and embed is not None:
            head.weight = embed.weight
            method = getattr(head, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(head)
