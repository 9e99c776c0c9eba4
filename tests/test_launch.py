"""`leafe launch`: the accelerate configs in configs/accelerate parse with accelerate's own loader, the
dry-run plan prints the exact `accelerate launch` line and what each rank does, bad configs and
commands that cannot run multi-process are refused in one line; and a real 2-process launch (CPU,
gloo) of `leafe distill` writes one loadable model directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_eval import leafe
from test_distill import trees_file  # noqa: F401 (the module's fixture)

from leafe.launch import launch_plan, load_accelerate_config

ROOT = Path(__file__).resolve().parent.parent
FSDP, ZERO3 = ROOT / "configs/accelerate/fsdp.yaml", ROOT / "configs/accelerate/zero3.yaml"
DISTILL = ["distill", "--model", "/models/qwen7b-grpo", "--trees", "/runs/explore/trees.jsonl", "--out", "/runs/leafe"]


def test_the_configs_are_what_accelerate_reads():
    fsdp, zero3 = load_accelerate_config(FSDP), load_accelerate_config(ZERO3)
    assert (fsdp.distributed_type.value, fsdp.num_processes, fsdp.mixed_precision) == ("FSDP", 8, "bf16")
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert (zero3.distributed_type.value, zero3.num_processes, zero3.mixed_precision) == ("DEEPSPEED", 8, "bf16")
    assert zero3.deepspeed_config["zero_stage"] == 3 and zero3.deepspeed_config["zero3_save_16bit_model"] is True


@pytest.mark.parametrize("config, sharding", [(FSDP, "FSDP v2: parameters, gradients and optimiser state split"),
                                              (ZERO3, "DeepSpeed ZeRO-3: parameters, gradients and optimiser")])
def test_dry_run_prints_the_plan_and_the_exact_command(config, sharding):
    run = leafe("launch", config, "--dry-run", "--num-processes", 4, "--", *DISTILL)
    assert run.returncode == 0, run.stderr
    out = " ".join(run.stdout.split())  # the console wraps long lines
    assert f"accelerate launch --config_file {config} --num_processes 4 -m leafe {' '.join(DISTILL)}" in out
    assert sharding in out and "processes 4 on 1 machine(s)" in out and "precision bf16" in out
    assert "rank 0 writes the model directory (/runs/leafe)" in out


def test_multi_machine_overrides_go_on_the_command_line():
    plan = launch_plan(FSDP, DISTILL, num_processes=16, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    assert plan.command[:12] == ["accelerate", "launch", "--config_file", str(FSDP), "--num_processes", "16",
                                 "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1"]
    assert "processes    16 on 2 machine(s), 8 per machine" in plan.lines


def bad_config(tmp_path, name, **changes) -> Path:
    import yaml

    data = yaml.safe_load(ZERO3.read_text() if name == "zero3" else FSDP.read_text())
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_what_cannot_run_is_refused_in_one_line(tmp_path):
    cases = [
        (["launch", tmp_path / "none.yaml", "--dry-run", "--", *DISTILL], "none.yaml does not exist"),
        (["launch", FSDP, "--dry-run", "--", "train", "--method", "grpo"],
         "leafe train runs in one process: GRPO samples from the policy it updates"),
        (["launch", FSDP, "--dry-run", "--", "eval", "--model", "m"], "leafe eval is not a training command"),
        (["launch", FSDP, "--dry-run", "--", *DISTILL, "--lora"], "--lora merges adapters"),
        (["launch", FSDP, "--dry-run", "--num-machines", 2, "--", *DISTILL], "needs --main-process-ip"),
        (["launch", FSDP, "--dry-run"], "nothing to launch"),
        (["launch", bad_config(tmp_path, "zero3", **{"deepspeed_config.zero_stage": 2}), "--dry-run", "--", *DISTILL],
         "zero_stage is 2; these configs are for ZeRO-3"),
        (["launch", bad_config(tmp_path, "fsdp", **{"fsdp_config.fsdp_state_dict_type": "SHARDED_STATE_DICT"}),
          "--dry-run", "--", *DISTILL], "fsdp_state_dict_type must be FULL_STATE_DICT"),
        (["launch", bad_config(tmp_path, "odd", distributed_type="MULTI_NPU"), "--dry-run", "--", *DISTILL],
         "distributed_type MULTI_NPU is not planned for"),
    ]
    for args, message in cases:
        run = leafe(*args)
        assert run.returncode == 2 and message in " ".join(run.stderr.split()), (args, run.stderr)
        assert len(run.stderr.strip().splitlines()) <= 3  # one message, wrapped at most by the console


@pytest.mark.slow
def test_two_cpu_processes_distil_into_one_loadable_model(trees_file, tiny_model_dir, tmp_path):  # noqa: F811
    """The same launch path on CPU: MULTI_CPU with 2 ranks (gloo). The Trainer splits the batches, rank
    0 gathers and writes the model, distill.json is written once."""
    config = tmp_path / "cpu2.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nmixed_precision: 'no'\n"
                      "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nuse_cpu: true\nmain_process_ip: 127.0.0.1\n"
                      "main_process_port: 29517\nrdzv_backend: static\nsame_network: true\n")
    out = tmp_path / "distilled"
    run = subprocess.run([sys.executable, "-m", "leafe", "launch", str(config), "--", "distill", "--model",
                          str(tiny_model_dir), "--trees", str(trees_file), "--out", str(out), "--epochs", "1",
                          "--lr", "1e-4", "--reh-fraction", "1"], check=False, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "distill.json").read_text())
    assert summary["training"]["steps"] >= 1
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for (n, a), (_, b) in zip(trained.named_parameters(), start.named_parameters()) if not a.equal(b)]
    assert changed  # the weights were trained and saved
