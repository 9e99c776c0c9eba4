"""GRPO when another engine samples: the loss against the published GRPO/DAPO objective written out
here from the papers, log-probs at the sampling temperature, and importance weights sample by sample,
with missing engine log-probs kept at weight 1 and counted (never a made-up 0.0)."""

from __future__ import annotations

import json
import math
import threading
import warnings
from http.server import ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch
from helpers import JSONHandler

from leafe.backends.base import SamplingParams
from leafe.episode import Episode, Step
from leafe.errors import LeafeError
from leafe.methods.grpo import (
    GRPOSettings,
    GRPOTrainer,
    Sample,
    agent_logprobs,
    group_samples,
    importance_weights,
    sampler_logp_tensor,
    sampler_logprobs,
    token_loss,
)


def _episode(k: int, task: str, success: bool, spans: list[tuple[int, int]],
             logprobs: list[list[float | None] | None] | None = None, length: int = 40) -> Episode:
    """Episode k: ids 1000k + j (so a sample's ids name its episode), agent turns at `spans`."""
    logprobs = logprobs or [None] * len(spans)
    steps = [Step(index=i, context_len=a, action_start=a, action_end=b, reply="", action="up", finish_reason="stop",
                  observation="", observation_hash="", reward=0.0, done=False, success=False, logprobs=lp)
             for i, ((a, b), lp) in enumerate(zip(spans, logprobs))]
    return Episode(task_id=task, env="sokoban", token_ids=[1000 * k + j for j in range(length)], first_observation="",
                   first_observation_hash="", steps=steps, success=success)


def _dapo_loss(episodes, theta, index, old, ref, sampler, eps_low, eps_high, beta, cap, adv_eps):
    """The objective as the papers write it, token by token, independent of leafe's code.

    GRPO (DeepSeekMath, eq. 3) with DAPO's token-level mean (DAPO, eq. 8) and dynamic sampling (groups
    whose rewards are all equal leave the batch): A_i = (R_i - mean(R)) / (std(R) + eps) over the group,
    r_t = exp(logp_t - logp_old_t), and the loss is the mean over every agent token of the batch of
        -w_t min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) + beta (exp(q_t) - q_t - 1),
    q_t = logp_ref_t - logp_t (the k3 estimator); w_t = min(exp(logp_old_t - logp_sampler_t), cap), the
    truncated importance weight of a token another engine sampled (1 where it reported no log-prob).
    """
    groups: dict[str, list[Episode]] = {}
    for e in episodes:
        groups.setdefault(e.task_id, []).append(e)
    terms, clipped = [], 0
    for group in groups.values():
        rewards = [1.0 if e.success else 0.0 for e in group]
        mean = sum(rewards) / len(rewards)
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
        if std == 0:
            continue
        for e, reward in zip(group, rewards):
            a = (reward - mean) / (std + adv_eps)
            k = e.token_ids[0] // 1000
            for step in e.steps:
                for j in range(step.action_start, step.action_end):
                    logp = theta[index[k, j]]
                    r = torch.exp(logp - old[k, j])
                    surrogate = torch.minimum(r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a)
                    s = sampler.get((k, j))
                    w = 1.0 if s is None else min(math.exp(old[k, j] - s), cap)
                    q = ref[k, j] - logp
                    terms.append(-w * surrogate + beta * (torch.exp(q) - q - 1))
                    clipped += int((r.item() > 1 + eps_high and a > 0) or (r.item() < 1 - eps_low and a < 0))
    return torch.stack(terms).sum() / len(terms), len(terms), clipped


def test_token_loss_equals_the_published_grpo_dapo_objective_with_its_gradient():
    gen = torch.Generator().manual_seed(0)
    # group a: rewards 1 0 0 1; group b: all failed (no variance: left out); group c: 1 0 1, unequal turns.
    # Episodes 1 and 5 were sampled by an engine that reported log-probs (one missing, one None).
    spans = {0: [(3, 7), (12, 15)], 1: [(2, 9)], 2: [(4, 6), (20, 31)], 3: [(5, 6)], 4: [(3, 8)], 5: [(2, 4)],
             6: [(6, 16), (25, 27)], 7: [(1, 3)], 8: [(9, 30)]}
    outcome = {0: ("a", True), 1: ("a", False), 2: ("a", False), 3: ("a", True), 4: ("b", False), 5: ("b", False),
               6: ("c", True), 7: ("c", False), 8: ("c", True)}
    old, ref, sampler, index = {}, {}, {}, {}
    for k, ks in spans.items():
        for a, b in ks:
            for j in range(a, b):
                index[k, j] = len(index)
                old[k, j] = -0.2 - 2.0 * torch.rand((), generator=gen, dtype=torch.float64).item()
                ref[k, j] = old[k, j] + 0.3 * torch.randn((), generator=gen, dtype=torch.float64).item()
    engine = {}
    for k in (1, 6, 5):
        lps = [[old[k, j] + 0.6 * torch.randn((), generator=gen, dtype=torch.float64).item() for j in range(a, b)]
               for a, b in spans[k]]
        engine[k] = lps
    engine[1][0][3] = None  # a token the engine reported no log-prob for
    engine[6][0] = engine[6][0][:-2]  # a step whose last two tokens have none
    for k, lps in engine.items():
        for (a, _b), values in zip(spans[k], lps):
            sampler.update({(k, a + i): v for i, v in enumerate(values) if v is not None})
    episodes = [_episode(k, *outcome[k], spans[k], engine.get(k)) for k in spans]
    # the policy's log-probs: the old ones moved far enough that some ratios leave [0.8, 1.2]
    theta = torch.tensor([old[key] for key in index], dtype=torch.float64)
    theta = (theta + 0.25 * torch.randn(theta.shape, generator=gen, dtype=torch.float64)).requires_grad_()
    clip_eps, beta, cap, adv_eps = 0.2, 0.05, 2.0, 1e-6

    samples, stats = group_samples(episodes, adv_eps=adv_eps)
    assert stats["skipped_groups"] == 1 and len(samples) == 7
    keys = [(x.ids[0] // 1000, j) for x in samples for j in range(1, len(x.ids)) if x.mask[j]]
    logp = theta[torch.tensor([index[key] for key in keys])]
    old_t = torch.tensor([old[key] for key in keys], dtype=torch.float64)
    ref_t = torch.tensor([ref[key] for key in keys], dtype=torch.float64)
    adv = torch.cat([torch.full((sum(x.mask[1:]),), x.advantage, dtype=torch.float64) for x in samples])
    sampled = sampler_logp_tensor(samples).double()
    assert int(torch.isnan(sampled).sum()) == sum(key not in sampler for key in keys)  # missing and unweighted alike
    weight = importance_weights(old_t, sampled, cap)
    parts = token_loss(logp, old_t, ref_t, adv, clip_eps, beta, normalizer=float(len(keys)), is_weight=weight)
    (leafe_grad,) = torch.autograd.grad(parts.loss, theta)

    expected, tokens, clipped = _dapo_loss(episodes, theta, index, old, ref, sampler, clip_eps, clip_eps, beta, cap,
                                           adv_eps)
    (paper_grad,) = torch.autograd.grad(expected, theta)
    assert parts.tokens == tokens == len(keys)
    assert 0 < parts.clipped == clipped < tokens  # some tokens clipped, not all
    assert (weight >= cap).any() and (weight[~torch.isnan(sampled)] < 1).any()  # capped and down-weighted tokens
    assert parts.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.allclose(leafe_grad, paper_grad, atol=1e-6, rtol=0)
    assert leafe_grad.abs().sum() > 0 and paper_grad[[index[4, 3], index[5, 2]]].abs().sum() == 0  # group b: no gradient


def test_settings_refuse_nucleus_sampling_and_greedy_sampling():
    with pytest.raises(LeafeError, match=r"--top-p must be 1 for GRPO.*got 0\.9"):
        GRPOSettings(top_p=0.9).validate()
    with pytest.raises(LeafeError, match=r"--temperature must be > 0 for GRPO"):
        GRPOSettings(temperature=0.0).validate()
    GRPOSettings(temperature=0.7).validate()  # any positive temperature is fine


def test_trainer_logprobs_are_those_of_the_sampling_temperature(tiny_model_dir):
    from leafe.backends.hf import HFBackend

    backend = HFBackend(str(tiny_model_dir), device="cpu", dtype="float32")
    ids = list(range(10, 40))
    mask = [0] * 30
    mask[5:9] = [1] * 4
    mask[20:23] = [1] * 3
    positions = [5, 6, 7, 8, 20, 21, 22]
    with torch.no_grad():
        logits = backend.model(torch.tensor([ids])).logits[0].float()
        at_07 = torch.log_softmax(logits / 0.7, -1)
        at_1 = torch.log_softmax(logits, -1)
    expected = [at_07[j - 1, ids[j]].item() for j in positions]
    entropy_07 = [-(at_07[j - 1].exp() * at_07[j - 1]).sum().item() for j in positions]
    with torch.no_grad():
        got, entropy = agent_logprobs(backend.model, [ids], [mask], backend.pad_id, with_entropy=True, temperature=0.7)
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert entropy.tolist() == pytest.approx(entropy_07, abs=1e-5)
    # the trainer scores the policy, the old policy and the reference through this, at its temperature
    trainer = GRPOTrainer(backend.model, backend, GRPOSettings(temperature=0.7, kl_coef=0.0), None)
    with torch.no_grad():
        scored, _ = trainer._logprobs(trainer.policy, [Sample(ids, mask, 1.0)])
    assert scored.tolist() == pytest.approx(expected, abs=1e-5)
    untempered = [at_1[j - 1, ids[j]].item() for j in positions]
    assert max(abs(a - b) for a, b in zip(scored.tolist(), untempered)) > 1e-2  # T = 0.7 is not T = 1


def test_missing_engine_logprobs_stay_none_per_token_and_survive_json():
    episode = _episode(0, "a", True, [(2, 5), (8, 10), (12, 14)], [[-0.5, None, -0.1], [-0.2], None])
    assert sampler_logprobs(episode) == [-0.5, None, -0.1, -0.2, None, None, None]
    assert sampler_logprobs(_episode(1, "a", True, [(2, 5)])) is None  # sampled by the trainer itself
    again = Episode.from_dict(json.loads(json.dumps(episode.to_dict(), allow_nan=False)))
    assert again.steps[0].logprobs == [-0.5, None, -0.1] and sampler_logprobs(again) == sampler_logprobs(episode)
    trainer_logp = torch.tensor([-1.0, -1.0, -1.0])
    weight = importance_weights(trainer_logp, torch.tensor([-1.0 - math.log(1.5), float("nan"), -0.5]), cap=2.0)
    assert weight.tolist() == pytest.approx([1.5, 1.0, math.exp(-0.5)])


def test_vllm_reports_no_made_up_logprob_for_a_token_without_one(tiny_tokenizer):
    from leafe.backends.vllm import VLLMBackend

    backend = VLLMBackend.__new__(VLLMBackend)  # `_completion` alone: no engine
    backend.tokenizer = tiny_tokenizer
    output = SimpleNamespace(token_ids=[5, 6, 7], finish_reason="stop",
                             logprobs=[{5: SimpleNamespace(logprob=-0.25)}, {}, {7: SimpleNamespace(logprob=-1.5)}])
    completion = backend._completion(output, SamplingParams(logprobs=True, stop_token_ids=(9,)))
    assert completion.token_ids == [5, 6, 7, 9]  # the stop id vLLM left out is appended, without a log-prob
    assert completion.logprobs == [-0.25, None, -1.5, None]


class _LogprobServer(JSONHandler):
    """Answers /completions with ids and a log-prob list that has a null and stops short."""

    def do_GET(self):
        self._send({"data": [{"id": "served"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send({"choices": [{"index": 0, "text": "x", "token_ids": [5, 6, 7], "finish_reason": "stop",
                                 "logprobs": {"token_logprobs": [-0.5, None, -0.75]}}]})


def test_openai_reports_no_made_up_logprob_for_a_token_without_one(tiny_model_dir):
    from leafe.backends import load_backend

    server = ThreadingHTTPServer(("127.0.0.1", 0), _LogprobServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = load_backend("openai", str(tiny_model_dir), base_url=f"http://127.0.0.1:{server.server_address[1]}/v1")
        (row,) = backend.generate([[5, 6, 7]], SamplingParams(logprobs=True, max_new_tokens=8, stop_token_ids=(9,)))
    finally:
        server.shutdown()
    assert row[0].token_ids == [5, 6, 7, 9]
    assert row[0].logprobs == [-0.5, None, -0.75, None]


@pytest.mark.parametrize("max_batch_tokens", [100_000, 40])  # one micro-batch; one sample per micro-batch
def test_a_batch_mixing_samples_with_and_without_engine_logprobs_weights_each_sample(tiny_model_dir,
                                                                                     max_batch_tokens):
    # One on-policy update (ratio 1): the gradient is -(1/N) sum_t w_t A_t grad log p_t, with w_t the engine
    # weight of samples that have engine log-probs and 1 for the others and for a token without one.
    from leafe.backends.hf import HFBackend

    backend = HFBackend(str(tiny_model_dir), device="cpu", dtype="float32")
    settings = GRPOSettings(kl_coef=0.0, max_grad_norm=1e9, is_cap=2.0, max_batch_tokens=max_batch_tokens)
    trainer = GRPOTrainer(backend.model, backend, settings, None, shared=False)  # as when vLLM samples
    samples = []
    for i, adv in enumerate([1.5, -0.5, -1.0, 0.75]):
        ids = [(11 * i + 3 * j) % 300 + 5 for j in range(20 + 4 * i)]
        mask = [0] * len(ids)
        mask[3:8] = [1] * 5
        mask[12 + i:] = [1] * (len(ids) - 12 - i)
        samples.append(Sample(ids, mask, adv))
    with torch.no_grad():
        logp = [agent_logprobs(backend.model, [x.ids], [x.mask], backend.pad_id)[0] for x in samples]
    # sample 0: the engine's numbers make w = 1.5, one token without a log-prob; sample 1: none at all;
    # sample 2: w = 3, capped at 2; sample 3: w = 0.5
    for x, lp, ratio in zip(samples, logp, [1.5, None, 3.0, 0.5]):
        if ratio is not None:
            x.sampler_logp = (lp - math.log(ratio)).tolist()
    samples[0].sampler_logp[2] = None
    weights = [torch.full_like(lp, min(r, 2.0)) if r else torch.ones_like(lp) for lp, r in zip(logp, [1.5, None, 3.0, 0.5])]
    weights[0][2] = 1.0
    captured = {}

    def capture(*args, **kwargs):
        captured.update({n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None})

    trainer.optimizer.step = capture
    with pytest.warns(UserWarning, match="is_unweighted_tokens and is_missing"):
        stats = trainer.update(samples, seed=0)
    n1 = len(logp[1])
    weighted = [w for i, w in enumerate(weights) if i != 1]
    assert stats["is_unweighted_tokens"] == n1 and stats["is_missing"] == 1
    reported = torch.cat([weighted[0][torch.arange(len(weighted[0])) != 2], weighted[1], weighted[2]])
    assert stats["is_weight"] == pytest.approx(reported.mean().item(), rel=1e-4)
    assert stats["is_capped"] == pytest.approx(len(logp[2]) / reported.numel())

    model = backend.model
    model.zero_grad()
    recomputed, _ = agent_logprobs(model, [x.ids for x in samples], [x.mask for x in samples], backend.pad_id)
    adv = torch.cat([torch.full((len(lp),), x.advantage) for x, lp in zip(samples, logp)])
    w = torch.cat(weights)
    (-(w * adv * recomputed).sum() / adv.numel()).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(captured[name], p.grad, atol=1e-6, rtol=1e-4), name

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        again = trainer.update(samples, seed=1)
    assert again["is_unweighted_tokens"] == n1
    assert not [w for w in seen if "is_unweighted_tokens" in str(w.message)]  # once per run, not every step


SAMPLE_AT_07 = '''
import json, sys
from leafe.backends import load_backend
from leafe.backends.base import SamplingParams

if __name__ == "__main__":
    prompts = json.loads(sys.argv[2])
    backend = load_backend("vllm", sys.argv[1], max_model_len=512, kv_cache_gb=1)
    rows = backend.generate(prompts, SamplingParams(n=2, temperature=0.7, max_new_tokens=12, logprobs=True))
    backend.close()
    print(json.dumps([[{"ids": c.token_ids, "logprobs": c.logprobs} for c in row] for row in rows]))
'''


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_reports_logprobs_at_the_temperature_it_sampled_with(hd64_model_dir, tmp_path):
    # What the trainer computes at T = 0.7 is what vLLM reports for what it sampled at T = 0.7
    # (its processed_logprobs mode): the importance weights compare the same distribution.
    from helpers import in_vllm_venv

    from leafe.backends.hf import HFBackend

    script = tmp_path / "sample.py"
    script.write_text(SAMPLE_AT_07)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    run = in_vllm_venv(script, hd64_model_dir, json.dumps(prompts))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    local = HFBackend(str(hd64_model_dir), device="cpu", dtype="float32")
    for prompt, row in zip(prompts, rows):
        for c in row:
            seq, mask = prompt + c["ids"], [0] * len(prompt) + [1] * len(c["ids"])
            with torch.no_grad():
                at_07, _ = agent_logprobs(local.model, [seq], [mask], local.pad_id, temperature=0.7)
                at_1, _ = agent_logprobs(local.model, [seq], [mask], local.pad_id)
            assert at_07.tolist() == pytest.approx(c["logprobs"], abs=2e-3)
            assert at_1.tolist() != pytest.approx(c["logprobs"], abs=2e-3)
