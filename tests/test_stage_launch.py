"""`leafe run` with `training.processes > 1`: the study starts GRPO and distillation under
`accelerate launch` itself (2 gloo ranks on this CPU machine), with an accelerate config made from
the `training:` section, and reads rank 0's result back."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import leafe
from test_distill import trees_file  # noqa: F401 (the module's fixture)
from test_study import tiny_study

from leafe.method import Job
from leafe.scale.launch import load_accelerate_config
from leafe.scale.stage import CONFIG, LOG, accelerate_config, launch
from leafe.settings import DistillSettings, SFTSettings, TrainingSettings


@pytest.mark.parametrize("sharding, cuda, kind", [("ddp", False, "MULTI_GPU"), ("fsdp", False, "FSDP"),
                                                  ("ddp", True, "MULTI_GPU"), ("fsdp", True, "FSDP"),
                                                  ("zero3", True, "DEEPSPEED")])
def test_the_training_section_becomes_a_config_accelerate_reads(tmp_path, sharding, cuda, kind):
    config = accelerate_config(TrainingSettings(processes=8, sharding=sharding), cuda=cuda)
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_accelerate_config(path)  # accelerate's own reader; leafe's check of every key
    assert loaded.distributed_type.value == kind and loaded.num_processes == 8
    assert str(getattr(loaded.mixed_precision, "value", loaded.mixed_precision)) == ("bf16" if cuda else "no")  # auto: bf16 on GPUs, fp32 on CPUs


def test_a_study_refuses_grpo_tasks_that_do_not_split_over_the_processes(tiny_model_dir, tmp_path):
    config = tiny_study(tmp_path, tiny_model_dir, training={"processes": 4})  # grpo.tasks_per_step is 2
    done = leafe("run", config, "--out", tmp_path / "run", "--dry-run")
    assert done.returncode == 2
    assert "grpo.tasks_per_step (2) must be a multiple of training.processes (4)" in done.stderr


def test_two_processes_distil_lora_adapters_and_rank_0_writes_them_merged(trees_file, tiny_model_dir, tmp_path):  # noqa: F811
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    result = launch("distill", Job(str(tiny_model_dir), out, inputs=[trees_file], device="cpu"),
                    TrainingSettings(processes=2), settings=DistillSettings(),
                    sft=SFTSettings(epochs=1, batch_size=2, lora=True, learning_rate=1e-2))
    assert result.method == "distill" and result.model == str(out) and result.data["training"]["steps"] > 0
    assert yaml.safe_load((out / CONFIG).read_text())["num_processes"] == 2
    log = (out / LOG).read_text()
    assert "accelerate launch" in log and "leafe.scale.stage" in log
    merged, base = load_file(out / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert set(merged) == set(base)  # a plain model: no adapter weights left
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert changed and all("proj" in k for k in changed)  # the adapted linear layers moved, nothing else


def test_two_processes_train_lora_grpo_with_the_adapters_off_as_reference(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from leafe.settings import GRPOSettings

    out = tmp_path / "grpo-lora"
    settings = GRPOSettings(tasks=4, task_seed=3, steps=2, tasks_per_step=2, group_size=4, learning_rate=1e-2,
                            max_new_tokens=8, env_params={"max_steps": 4}, invalid_penalty=0.1, save_every=0,
                            lora=True, lora_r=4)
    launch("grpo", Job(str(tiny_model_dir), out, device="cpu"), TrainingSettings(processes=2), settings=settings)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and any(r.get("agent_tokens") for r in log)
    assert all(r["kl"] >= 0 for r in log if "kl" in r)  # k3 KL against the base with its adapters off
    assert (out / "adapter" / "adapter_config.json").exists()  # the adapters alone ...
    merged, base = load_file(out / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert set(merged) == set(base)  # ... and a plain merged model
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert changed and all("proj" in k for k in changed)


@pytest.mark.slow
def test_a_study_trains_grpo_distillation_and_early_experience_sharded_in_bf16(tiny_model_dir, tmp_path):
    config = tiny_study(tmp_path, tiny_model_dir, methods=["base", "grpo", "leafe", "early_experience"],
                        training={"processes": 2, "sharding": "fsdp", "mixed_precision": "bf16"}, grpo={"steps": 2})
    run_dir = tmp_path / "run"
    done = leafe("run", config, "--out", run_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    grpo = run_dir / "grpo" / "train"
    steps = [json.loads(line) for line in (grpo / "log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]  # rank 0 logs each step once, with both ranks' episodes
    assert all(s["groups"] == 2 for s in steps)  # tasks_per_step 2: one task on each rank
    assert yaml.safe_load((grpo / CONFIG).read_text())["num_processes"] == 2
    assert (grpo / "model.safetensors").exists()
    distill = run_dir / "leafe" / "distill"
    assert (distill / CONFIG).exists()  # distillation went through the launcher too
    ee = run_dir / "early_experience" / "train"
    assert (ee / "iwm" / CONFIG).exists() and (ee / CONFIG).exists()  # both of its trainings, launched
    assert json.loads((ee / "train.json").read_text())["training"]["imitation"]["steps"] > 0
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["methods"]) == {"base", "grpo", "leafe", "early_experience"}
    sharded = {"processes": 2, "machines": 1, "sharding": "fsdp2", "mixed_precision": "bf16", "device": "cpu"}
    assert results["cost"]["grpo.train"]["ran"] == {**sharded, "weights_to_engine": "in-memory"}
    assert results["cost"]["early_experience.train"]["ran"] == sharded
    if json.loads((run_dir / "leafe" / "distill" / "stage.json").read_text())["trained"]:
        assert results["cost"]["leafe.distill"]["ran"] == sharded
    again = leafe("run", config, "--out", run_dir)  # finished: nothing relaunched
    assert again.returncode == 0 and (grpo / "log.jsonl").read_text().count("\n") == 2


@pytest.mark.slow
def test_a_study_trains_across_two_machines_on_localhost(tiny_model_dir, tmp_path):
    # Two `leafe run` processes stand for two machines (one training process each) sharing the run
    # directory, as machines share a filesystem: machine 0 runs the study, machine 1 joins its GRPO.
    import subprocess

    from helpers import free_port, leafe_command

    port = free_port()
    config = tiny_study(tmp_path, tiny_model_dir, methods=["base", "grpo"], grpo={"steps": 2},
                        training={"processes": 1, "machines": 2, "main_address": "127.0.0.1", "main_port": port,
                                  "sharding": "fsdp"})
    run_dir = tmp_path / "run"
    leafe_cli = leafe_command("run", config, "--out", run_dir)
    second = subprocess.Popen([*leafe_cli, "--set", "training.machine_rank=1"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        first = leafe("run", config, "--out", run_dir)
        assert first.returncode == 0, first.stderr[-2000:]
        said, _ = second.communicate(timeout=120)
    finally:
        second.kill()
    assert second.returncode == 0, said[-2000:]
    assert "joined 1 training launch(es)" in said
    grpo = run_dir / "grpo" / "train"
    assert (grpo / "launch.machine1.log").exists()  # machine 1's ranks ran
    assert yaml.safe_load((grpo / "accelerate.machine1.yaml").read_text())["machine_rank"] == 1
    results = json.loads((run_dir / "results.json").read_text())
    assert results["cost"]["grpo.train"]["ran"] == {"processes": 2, "machines": 2, "sharding": "fsdp2",
                                                    "mixed_precision": "no", "device": "cpu",
                                                    "weights_to_engine": "in-memory"}
    steps = [json.loads(line) for line in (grpo / "log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(s["groups"] == 2 for s in steps)  # a task per machine
