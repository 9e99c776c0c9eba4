"""Shared fixtures: a tiny random Llama with a tokenizer trained in the test, and a scripted backend."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import distilled_model, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama + trained BPE tokenizer + ChatML template, on disk."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def hd64_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama at head_dim 64 (same tokenizer): vLLM's CPU attention has no head_dim 16 (the default's)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-hd64"), hidden=256)


@pytest.fixture(scope="session")
def distilled_model_dir(hd64_model_dir, tmp_path_factory) -> Path:
    """The hd64 Llama after a `leafe distill` (helpers.distilled_model): a model directory as leafe writes
    it, which vLLM also serves (head_dim 64)."""
    return distilled_model(hd64_model_dir, tmp_path_factory.mktemp("distilled"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    from leafe.backends.hf import HFBackend

    return HFBackend(str(tiny_model_dir), device="cpu")
