"""GRPO with its rollouts on vLLM (inside .venv-vllm, vLLM for CPU): the trainer's weights reach the
engine after every step, and the engine's log-probs weight the policy gradient.

The sync is checked where it shows: vLLM's log-probs of a fixed sequence equal the trainer's after
`load_weights`, and differ by about the update's size when it is skipped; in a GRPO run, the gap
between what the engine reported for what it sampled and what the trainer computes for the same ids
stays at float noise on the second step, and grows when the sync is switched off."""

from __future__ import annotations

import json

import pytest
from test_backend_vllm import HERE, in_vllm_venv

pytestmark = pytest.mark.slow

#: fp32 on both sides; the engine's kernels differ from transformers' in summation order only.
SAME = 1e-4


@pytest.fixture(scope="module")
def probe(hd64_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm-grpo")
    run = in_vllm_venv(HERE / "vllm_grpo_probe.py", hd64_model_dir, work, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_the_engine_scores_with_the_trainers_weights_after_a_sync_and_not_before(probe, head):
    gaps = probe[head]
    assert gaps["initial"] < SAME  # the same weights: the same log-probs
    assert gaps["unsynced"] > 100 * SAME  # an update the engine has not seen: what skipping the sync leaves
    assert gaps["synced"] < SAME


def test_grpo_on_vllm_samples_each_step_from_the_weights_it_trains(probe):
    synced, unsynced = probe["grpo"], probe["grpo_unsynced"]
    assert [r["step"] for r in synced] == [1, 2] and all("sync_s" in r for r in synced)
    assert all(r["agent_tokens"] > 0 for r in synced)  # both steps updated the policy
    # step 1 samples the starting weights on both runs; step 2 samples step 1's weights only when synced
    assert synced[0]["sampler_gap"] < SAME and unsynced[0]["sampler_gap"] < SAME
    assert synced[1]["sampler_gap"] < SAME
    assert unsynced[1]["sampler_gap"] > 100 * SAME
    # the importance weights are 1 where the engine agrees with the trainer, and move off 1 where not
    assert synced[1]["is_weight"] == pytest.approx(1.0, abs=1e-3)
    assert abs(unsynced[1]["is_weight"] - 1.0) > 1e-3
