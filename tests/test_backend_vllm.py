"""The vllm backend, in process, run inside .venv-vllm (vLLM for CPU pins its own torch and
transformers; `make vllm-env` installs leafe there too): greedy ids equal the hf backend's on the
same model and prompts, n samples per prompt with stop ids and log-probs, prefix caching reuses a
shared branch history, and (tests/test_grpo_vllm.py) the command line's --backend vllm options reach the engine."""

from __future__ import annotations

import json

import pytest
from helpers import PROBES, in_vllm_venv

from leafe.backends import SamplingParams
from leafe.backends.hf import HFBackend
from leafe.chat import ChatFormat
from leafe.methods.grpo import agent_logprobs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def probe(hd64_model_dir, tiny_tokenizer, tmp_path_factory):
    fmt = ChatFormat(tiny_tokenizer)
    prompts = [fmt.encode(t) for t in ["Push the box onto the goal.", "You are in a kitchen. Find the apple.",
                                       "Boil water."]]
    prompt_file = tmp_path_factory.mktemp("vllm-probe") / "prompts.json"
    prompt_file.write_text(json.dumps(prompts))
    run = in_vllm_venv(PROBES / "vllm_probe.py", hd64_model_dir, prompt_file)
    assert run.returncode == 0, run.stderr[-3000:]
    return prompts, fmt, json.loads(run.stdout.strip().splitlines()[-1])


def test_greedy_ids_equal_the_hf_backends(probe, hd64_model_dir):
    prompts, _, out = probe
    local = HFBackend(str(hd64_model_dir), device="cpu", dtype="float32")
    greedy = local.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=16))
    assert out["greedy"] == [row[0].token_ids for row in greedy]


def test_n_samples_per_prompt_with_stop_ids_and_logprobs_on_the_sampled_ids(probe, hd64_model_dir, tiny_tokenizer):
    prompts, fmt, out = probe
    assert out["max_context"] == 1024
    assert [len(row) for row in out["sampled"]] == [4, 4, 4]
    local = HFBackend(str(hd64_model_dir), device="cpu", dtype="float32")
    for prompt, row in zip(prompts, out["sampled"]):
        assert len({tuple(c["ids"]) for c in row}) > 1  # n samples of one prompt differ
        for c in row:
            assert 1 <= len(c["ids"]) <= 24 and len(c["logprobs"]) == len(c["ids"])
            assert c["finish"] == ("stop" if c["ids"][-1] == fmt.end_of_turn_id else "length")
            assert tiny_tokenizer.decode(c["ids"], skip_special_tokens=True) == c["text"]
        # The log-probs are the model's (untempered) ones of exactly these ids: recomputed here, the same.
        for c in row:
            seq = prompt + c["ids"]
            mask = [0] * len(prompt) + [1] * len(c["ids"])
            recomputed, _ = agent_logprobs(local.model, [seq], [mask], local.pad_id)
            assert recomputed.tolist() == pytest.approx(c["logprobs"], abs=2e-3)
    assert out["next_call_differs"]  # a new call draws new seeds


def test_prefix_caching_skips_the_shared_history_of_branches(probe):
    _, _, out = probe
    stats, shared = out["branch_stats"], out["shared"]
    assert stats["prompt_tokens"] == 4 * (shared + 3)
    # The first branch fills the cache; the other three find the whole-block part of h_tau cached.
    block = 128  # vLLM's CPU block size; only whole blocks are cached
    assert stats["prefill_tokens"] <= (shared + 3) + 3 * (shared + 3 - (shared // block) * block)
    assert stats["prefill_tokens"] < stats["prompt_tokens"] // 2
