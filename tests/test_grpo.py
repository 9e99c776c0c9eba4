"""GRPO: advantages and loss on hand-computable groups, exact log-probs, and real training steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

from leafe.episode import Episode, Step
from leafe.errors import LeafeError
from leafe.method import Job
from leafe.methods.grpo import (
    GRPOSettings,
    GRPOTrainer,
    agent_logprobs,
    episode_reward,
    group_advantages,
    group_samples,
    task_schedule,
    token_loss,
    train_grpo,
)


def _episode(task: str, success: bool, invalid: int = 0, ids: list[int] | None = None) -> Episode:
    steps = [Step(index=i, context_len=0, action_start=2, action_end=4, reply="", action="up", finish_reason="stop",
                  observation="", observation_hash="", reward=0.0, done=False, success=False,
                  info={"invalid": i < invalid}) for i in range(max(invalid, 1))]
    return Episode(task_id=task, env="sokoban", token_ids=ids or [5, 6, 7, 8, 9], first_observation="",
                   first_observation_hash="", steps=steps, success=success)


def test_group_advantages_by_hand():
    # rewards 1, 0, 0, 1: mean 0.5, unbiased std sqrt(1/3)
    adv = group_advantages([1.0, 0.0, 0.0, 1.0], eps=0.0)
    s = math.sqrt(1 / 3)
    assert adv == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s])
    assert group_advantages([0.0, 0.0, 0.0]) is None  # nothing to learn: skipped
    assert group_advantages([1.0, 1.0]) is None


def test_invalid_penalty_is_per_invalid_action():
    assert episode_reward(_episode("a", True, invalid=2), 0.1) == pytest.approx(0.8)
    assert episode_reward(_episode("a", False, invalid=3), 0.0) == 0.0


def test_token_loss_by_hand():
    # Two tokens of an episode with A = +1 and one of an episode with A = -2; ratios 1.5, 1.0, 0.5.
    old = torch.log(torch.tensor([0.2, 0.5, 0.4]))
    logp = torch.log(torch.tensor([0.3, 0.5, 0.2]))
    ref = torch.log(torch.tensor([0.3, 0.25, 0.2]))
    adv = torch.tensor([1.0, 1.0, -2.0])
    parts = token_loss(logp, old, ref, adv, clip_eps=0.2, kl_coef=0.5, normalizer=4.0)
    # pg: token 0 clipped at 1.2 -> -1.2; token 1 -> -1.0; token 2: min(0.5*-2, 0.8*-2) = -1.6 -> +1.6
    pg = [-1.2, -1.0, 1.6]
    q = [0.0, math.log(0.5), 0.0]  # log(ref / p)
    kl = [math.exp(x) - x - 1 for x in q]
    expected = sum(p + 0.5 * k for p, k in zip(pg, kl)) / 4.0
    assert parts.loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts.clipped == 2  # token 0 (ratio above 1.2 with A > 0) and token 2 (below 0.8 with A < 0)
    assert parts.kl == pytest.approx(sum(kl), rel=1e-5)


def test_on_policy_gradient_is_advantage_weighted_score():
    # With old = logp (one update per batch) and no KL, d loss / d logp_t = -A_t / N.
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 0.5])
    token_loss(logp, logp.detach(), None, adv, 0.2, 0.0, normalizer=3.0).loss.backward()
    assert logp.grad.tolist() == pytest.approx([-2 / 3, 1 / 3, -0.5 / 3])


def test_zero_variance_groups_are_skipped_and_counted():
    episodes = [_episode("a", True), _episode("a", False), _episode("b", False), _episode("b", False)]
    samples, stats = group_samples(episodes)
    assert stats["groups"] == 2 and stats["skipped_groups"] == 1 and stats["skip_rate"] == 0.5
    assert [round(s.advantage, 4) for s in samples] == [0.7071, -0.7071]  # only group "a" is left


def test_only_agent_tokens_are_scored(tiny_backend):
    # agent_logprobs must return exactly log p(ids[j] | ids[:j]) at the masked positions, nothing else.
    ids = list(range(10, 40))
    mask = [0] * 30
    mask[5:8] = [1, 1, 1]
    mask[20:22] = [1, 1]
    model = tiny_backend.model
    with torch.no_grad():
        got, entropy = agent_logprobs(model, [ids, ids[:12]], [mask, mask[:12]], tiny_backend.pad_id, with_entropy=True)
        full = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    expected = [full[j - 1, ids[j]].item() for j in (5, 6, 7, 20, 21)] + [full[j - 1, ids[j]].item() for j in (5, 6, 7)]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert entropy.shape == got.shape and bool((entropy > 0).all())


def test_sampler_logprobs_match_recomputed(tiny_backend):
    from leafe.envs import make
    from leafe.rollout import RolloutEngine

    engine = RolloutEngine(tiny_backend, max_new_tokens=12, logprobs=True, seed=3)
    env = make("sokoban", max_steps=3)
    tasks = env.make_tasks(2, 11)
    episodes = engine.run([engine.start(make("sokoban", max_steps=3), t) for t in tasks for _ in range(2)])
    model = tiny_backend.model
    for e in episodes:
        sampled = [lp for s in e.steps for lp in s.logprobs]
        with torch.no_grad():
            recomputed, _ = agent_logprobs(model, [e.token_ids], [e.loss_mask()], tiny_backend.pad_id)
        assert len(sampled) == recomputed.numel() > 0
        assert recomputed.tolist() == pytest.approx(sampled, abs=2e-4)


def test_task_schedule_covers_every_task_each_epoch():
    seen = [i for step in range(5) for i in task_schedule(10, 2, step, seed=1)]
    assert sorted(seen) == list(range(10))
    assert task_schedule(10, 2, 0, seed=1) != task_schedule(10, 2, 0, seed=2)


def test_settings_are_validated():
    with pytest.raises(LeafeError, match="group-size"):
        GRPOSettings(group_size=1).validate()
    with pytest.raises(LeafeError, match="tasks-per-step"):
        GRPOSettings(tasks=2, tasks_per_step=4).validate()


def test_grpo_steps_change_weights_checkpoint_and_resume(tiny_model_dir, tmp_path, caplog):
    from leafe.backends.hf import HFBackend

    settings = GRPOSettings(tasks=4, task_seed=3, steps=3, tasks_per_step=2, group_size=4, learning_rate=1e-2,
                            max_new_tokens=8, env_params={"max_steps": 4}, save_every=2, invalid_penalty=0.1)
    out = tmp_path / "grpo"
    summary = train_grpo(Job(str(tiny_model_dir), out, device="cpu"), settings)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line]
    assert len(log) == 3
    assert all(0 < r["rollout_s"] <= r["wall_s"] for r in log)  # where a step's time went: sampling, then update
    assert "Removed shared tensor" not in caplog.text  # the tied head's save warning, once printed at every save
    assert summary.method == "grpo" and summary.model == str(out)
    assert summary.cost["env_steps"] > 0 and summary.data["groups"] == 6
    assert (out / "checkpoints" / "step-2" / "state" / "optimizer.bin").exists()
    HFBackend(str(out / "checkpoints" / "step-2"), device="cpu")  # a checkpoint loads like any model
    trained = HFBackend(str(out), device="cpu").model.state_dict()
    start = HFBackend(str(tiny_model_dir), device="cpu").model.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the invalid penalty gives variance
    # A longer run with the same settings resumes from step 2 and redoes only step 3 onwards.
    settings.steps = 4
    train_grpo(Job(str(tiny_model_dir), out, device="cpu"), settings)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    before = (out / "log.jsonl").read_text()
    again = train_grpo(Job(str(tiny_model_dir), out, device="cpu"), settings)  # finished: nothing is redone
    assert (out / "log.jsonl").read_text() == before and again.settings["steps"] == 4
    settings.learning_rate = 1e-3
    with pytest.raises(LeafeError, match="different settings"):
        train_grpo(Job(str(tiny_model_dir), out, device="cpu"), settings)


def test_checkpoints_keep_models_and_only_the_newest_training_state(tiny_model_dir, tmp_path):
    settings = GRPOSettings(tasks=2, task_seed=3, steps=4, tasks_per_step=1, group_size=2, max_new_tokens=4,
                            env_params={"max_steps": 2}, save_every=1, keep_checkpoints=2)
    out = tmp_path / "grpo"
    train_grpo(Job(str(tiny_model_dir), out, device="cpu"), settings)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-2", "step-3"]  # step 4 is the final model itself
    assert (out / "checkpoints" / "step-3" / "state").is_dir() and not (out / "checkpoints" / "step-2" / "state").exists()
    assert (out / "checkpoints" / "step-2" / "model.safetensors").exists()


def test_update_gradient_equals_reinforce_over_all_tokens(tiny_model_dir):
    # One on-policy update, split into micro-batches, must apply exactly the gradient of
    # -(1/N) sum_i A_i sum_{t in agent tokens of i} log p(t): REINFORCE with group advantages.
    from leafe.backends.hf import HFBackend
    from leafe.methods.grpo import Sample

    backend = HFBackend(str(tiny_model_dir), device="cpu")
    trainer = GRPOTrainer(backend.model, backend, GRPOSettings(kl_coef=0.0, max_batch_tokens=60, max_grad_norm=1e9), None)
    samples = []
    for i, adv in enumerate([1.5, -0.5, -1.0, 0.25]):
        ids = [(7 * i + j) % 300 + 5 for j in range(20 + 5 * i)]
        mask = [0] * len(ids)
        mask[4:9] = [1] * 5
        mask[12 + i :] = [1] * (len(ids) - 12 - i)
        samples.append(Sample(ids, mask, adv))
    captured = {}

    def capture(*args, **kwargs):
        captured.update({n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None})

    trainer.optimizer.step = capture
    trainer.update(samples, seed=0)
    assert len(trainer._micro_batches(samples, 0)) > 1  # the accumulation path is exercised

    model = backend.model
    model.zero_grad()
    logp, _ = agent_logprobs(model, [s.ids for s in samples], [s.mask for s in samples], backend.pad_id)
    adv = torch.cat([torch.full((sum(s.mask[1:]),), s.advantage) for s in samples])
    (-(logp * adv).sum() / adv.numel()).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(captured[name], p.grad, atol=1e-6, rtol=1e-4), name


GRADIENT_OF_ONE_UPDATE = '''
import os, random, sys
import torch
from leafe.backends.hf import HFBackend
from leafe.methods.grpo import GRPOTrainer, Sample
from leafe.settings import GRPOSettings

model, out, split, passes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
rng = random.Random(1)
samples = []
for _ in range(6):
    n = rng.randint(20, 60)
    mask = [0] * 10 + [int(rng.random() < 0.5) for _ in range(n - 10)]
    samples.append(Sample([rng.randrange(5, 500) for _ in range(n)], mask, rng.uniform(-1, 1)))
cut = int(split)
mine = samples if world == 1 else (samples[:cut] if rank == 0 else samples[cut:])
torch.manual_seed(0)
backend = HFBackend(model, device="cpu", dtype="float32")
trainer = GRPOTrainer(backend.model, backend, GRPOSettings(kl_coef=0.0, max_batch_tokens=100, updates_per_batch=passes))
seen = {}
clip = trainer.accelerator.clip_grad_norm_
def capture(params, max_norm):
    seen["g"] = torch.cat([p.grad.flatten() for p in trainer.accelerator.unwrap_model(trainer.policy).parameters()])
    return clip(params, max_norm)
trainer.accelerator.clip_grad_norm_ = capture
stats = trainer.update(mine, seed=0)
if rank == 0:
    torch.save({"grad": seen["g"], "stats": stats}, out)
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()  # leave the process group together (a rank exiting alone may abort)
'''


@pytest.mark.slow
@pytest.mark.parametrize(("split", "passes"), [(5, 1), (6, 1), (5, 2)])  # rank 1 holds 1 sample / none (a zero gradient)
def test_two_ranks_compute_the_gradient_of_one_process_on_all_samples(tiny_model_dir, tmp_path, split, passes):
    """Data-parallel GRPO: ranks with different samples and micro-batch counts meet in one all-reduce per
    optimiser step, and the loss is the token mean over every rank's samples, as in one process; with two
    passes the second gradient (clipped ratios against the sampling weights) matches too."""
    import subprocess
    import sys
    from pathlib import Path

    from helpers import two_rank_config

    script = tmp_path / "update.py"
    script.write_text(GRADIENT_OF_ONE_UPDATE)
    config = two_rank_config(tmp_path / "ddp2.yaml")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    for cmd in ([sys.executable, str(script)],
                [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config), str(script)]):
        target = one if len(cmd) == 2 else two
        run = subprocess.run([*cmd, str(tiny_model_dir), str(target), str(split), str(passes)], check=False, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    a, b = torch.load(one), torch.load(two)
    assert torch.allclose(a["grad"], b["grad"], rtol=1e-4, atol=1e-7)
    assert b["stats"]["agent_tokens"] == a["stats"]["agent_tokens"]
    assert b["stats"]["loss"] == pytest.approx(a["stats"]["loss"], rel=1e-5)
