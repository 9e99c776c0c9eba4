"""GRPO with its rollouts on vLLM (inside .venv-vllm, vLLM for CPU): the trainer's weights reach the
engine after every step, and the engine's log-probs weight the policy gradient.

The sync is checked where it shows: vLLM's log-probs of a fixed sequence equal the trainer's after
`load_weights`, and differ by about the update's size when it is skipped (what a missing sync would
leave); in a GRPO run, the gap between what the engine reported for what it sampled and what the
trainer computes for the same ids stays at float noise on the second step (LoRA: merged weights).
(Measured once with the sync switched off in a run: the second step's gap was 0.39 nats a token,
importance weights 1.06, 8% of them capped.)"""

from __future__ import annotations

import json

import pytest
from helpers import PROBES, in_vllm_venv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # two engine starts, ~30 s each here

#: fp32 on both sides; the engine's kernels differ from transformers' in summation order only.
SAME = 1e-4


@pytest.fixture(scope="module")
def probe(hd64_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm-grpo")
    run = in_vllm_venv(PROBES / "vllm_grpo_probe.py", hd64_model_dir, work, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_engine_scores_with_the_trainers_weights_after_a_sync_and_not_before(probe):
    gaps = probe["tied"]  # a tied head: the case vLLM's own in-place reload gets wrong
    assert gaps["initial"] < SAME  # the same weights: the same log-probs
    assert gaps["unsynced"] > 100 * SAME  # an update the engine has not seen: what skipping the sync leaves
    assert gaps["synced"] < SAME


def test_grpo_on_vllm_samples_each_step_from_the_weights_it_trains(probe):
    steps = probe["grpo"]  # `leafe train grpo --backend vllm --lora` on an untied copy, as 7B checkpoints are
    assert [r["step"] for r in steps] == [1, 2] and all("sync_s" in r for r in steps)
    assert all(r["agent_tokens"] > 0 for r in steps)  # both steps updated the policy
    # step 2 samples step 1's weights (W + BA merged): what the engine reported is what the trainer
    # computes; an engine left unsynced is off by the update's size, as the test above shows
    assert steps[0]["sampler_gap"] < SAME and steps[1]["sampler_gap"] < SAME
    assert steps[1]["is_weight"] == pytest.approx(1.0, abs=1e-3)  # the importance weights are 1 where they agree
