"""What vLLM's workers need to take a trainer's new weights: loaded by vLLM itself into each worker
(`worker_extension_cls`), never by leafe's process, so this module imports nothing at leafe's import.

`leafe_reload(path)` reloads the weights in place from a Hugging Face directory (vLLM's
`reload_weights`, which re-runs each layer's post-load processing: a CPU worker repacks its linear
layers, so writing into the parameters directly would leave the packed copies stale). vLLM 0.32's
layerwise reload skips a tied output head (it receives no weights of its own) and keeps its old
packed copy, so a model with tied embeddings has its head tied again and re-processed here:
without it the synced engine still scores every token with the old head (measured on CPU: the
log-prob gap to the trainer stays at the unsynced size).
"""

from __future__ import annotations


class WeightSync:
    """Mixed into vLLM's worker class; called through `LLM.collective_rpc("leafe_reload", ...)`."""

    def leafe_reload(self, path: str) -> int:
        self.reload_weights(weights_path=path)
        model = self.model_runner.get_model()
        head, inner = getattr(model, "lm_head", None), getattr(model, "model", None)
        tied = getattr(self.model_config.hf_config, "tie_word_embeddings", False)
        embed = getattr(inner, "embed_tokens", None)
        if tied and head is not None and embed is not None:
            head.weight = embed.weight
            method = getattr(head, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(head)
        return sum(p.numel() for p in model.parameters())
