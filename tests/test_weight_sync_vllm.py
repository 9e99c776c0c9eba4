"""`VLLMBackend.update_weights`: a trainer's weights reach the vLLM engine in memory (no file), and the
engine then scores a sequence as the trainer's model does, on a tied head (vLLM's reload alone
misses it), an untied one, and Qwen2.5's architecture (biased q/k/v, tied head, real tokenizer).

Every weight is perturbed before a sync, so a weight left stale (one the update skipped, the CPU
worker's packed copy of a layer, the tied head) keeps the engine's log-probs off by the
perturbation's size ("unsynced"). The engine runs inside .venv-vllm (vLLM for CPU; no pytest there):
tests/probes/vllm_weight_sync_probe.py prints one JSON line of log-prob gaps that these tests check.
"""

from __future__ import annotations

import json

import pytest
from helpers import PROBES, in_vllm_venv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # three engine starts, ~30 s each here

#: fp32 on both sides: the engine's kernels differ from transformers' in summation order only.
SAME = 1e-3


@pytest.fixture(scope="module")
def measured(hd64_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm-weight-sync")
    run = in_vllm_venv(PROBES / "vllm_weight_sync_probe.py", hd64_model_dir, work, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["tied", "untied", "qwen2.5"])
def test_update_weights_puts_the_trainers_weights_into_the_engine(measured, model):
    if model not in measured:
        pytest.skip("no ../shared/data/tokenizers/qwen2.5 (tests/probes/real_models.py)")
    gaps = measured[model]
    assert gaps["initial"] < SAME  # the same weights: the same log-probs
    assert gaps["unsynced"] > 30 * SAME and gaps["unsynced_2"] > 30 * SAME  # what a no-op sync leaves
    assert gaps["synced"] < SAME
    assert gaps["synced_2"] < SAME  # again, on an engine already updated in memory (chunked: layer by parts)
    assert gaps["generates"] == 4
    assert gaps["bytes"] == gaps["expected_bytes"]  # every weight once, in the engine's dtype (fp32)


@pytest.mark.parametrize("model", ["tied", "untied", "qwen2.5"])
def test_a_sync_missing_a_weight_fails_loudly_and_the_next_one_recovers(measured, model):
    if model not in measured:
        pytest.skip("no ../shared/data/tokenizers/qwen2.5 (tests/probes/real_models.py)")
    gaps = measured[model]
    assert "model.layers.1.mlp.down_proj.weight" in gaps["missing_error"]
    assert gaps["synced_after_error"] < SAME


def test_the_file_path_still_works_after_in_memory_updates(measured):
    assert measured["tied"]["file_synced"] < SAME
