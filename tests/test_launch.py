"""`leafe launch`: the accelerate configs in leafe/configs/accelerate are what accelerate launch turns into its
FSDP and DeepSpeed plugins; the dry-run plan prints the exact `accelerate launch` line and what each
rank does; bad configs and commands that cannot run multi-process are refused in one line; and a real
2-rank launch (torchrun, gloo on CPU) of `leafe distill` splits the batches and writes one loadable
model directory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from helpers import leafe, two_rank_config
from test_distill import trees_file  # noqa: F401 (the module's fixture)
from typer.testing import CliRunner

from leafe.cli.app import LeafeGroup
from leafe.errors import LeafeError
from leafe.scale.launch import LAUNCH_CONTEXT, launch_cmd, load_accelerate_config, prepare_launch

ROOT = Path(__file__).resolve().parent.parent
FSDP, ZERO3, DDP = (ROOT / "leafe/configs/accelerate" / name for name in ("fsdp.yaml", "zero3.yaml", "ddp.yaml"))
DISTILL = ["distill", "--model", "/models/qwen7b-grpo", "--trees", "/runs/explore/trees.jsonl", "--out", "/runs/leafe"]
GRPO = ["train", "grpo", "--model", "/models/qwen7b", "--out", "/runs/grpo"]

# The line that registers the command in leafe/cli/tools.py, under leafe's group (its one-line errors).
app = typer.Typer(cls=LeafeGroup)
app.command("launch", context_settings=LAUNCH_CONTEXT)(launch_cmd)
app.callback()(lambda: None)  # keep `launch` a subcommand, as in the leafe app


def launch(*args):
    return CliRunner().invoke(app, ["launch", *map(str, args)])


def config_like(tmp_path, base: Path, name: str = "changed", **changes) -> Path:
    """`base` with `changes` applied ("section.key" reaches into fsdp_config / deepspeed_config; None deletes)."""
    data = yaml.safe_load(base.read_text())
    for key, value in changes.items():
        section, _, field = key.partition(".")
        target, key = (data[section], field) if field else (data, section)
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_configs_are_what_accelerate_reads():
    fsdp, zero3 = load_accelerate_config(FSDP), load_accelerate_config(ZERO3)
    assert (fsdp.distributed_type.value, fsdp.num_processes, fsdp.num_machines, fsdp.mixed_precision) == (
        "FSDP", 8, 1, "bf16")
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert (zero3.distributed_type.value, zero3.num_processes, zero3.num_machines, zero3.mixed_precision) == (
        "DEEPSPEED", 8, 1, "bf16")
    assert zero3.deepspeed_config["zero_stage"] == 3 and zero3.deepspeed_config["zero3_save_16bit_model"] is True
    ddp = load_accelerate_config(DDP)
    assert (ddp.distributed_type.value, ddp.num_processes, ddp.mixed_precision) == ("MULTI_GPU", 8, "bf16")


def _accelerate_launch_env(config: Path) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file config` hands its ranks (environment), short of starting them."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", str(config), "-m", "leafe", "distill"]))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_accelerate_launch_turns_fsdp_yaml_into_layerwise_full_shard(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    args, env = _accelerate_launch_env(FSDP)
    assert args.use_fsdp and args.num_processes == 8
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # reads the environment, as the Trainer's does on every rank
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT" and plugin.cpu_ram_efficient_loading
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    plugin.set_auto_wrap_policy(model)
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {LlamaDecoderLayer}  # one unit per layer


def test_accelerate_launch_turns_zero3_yaml_into_stage3_saving_16bit_weights(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    args, env = _accelerate_launch_env(ZERO3)
    assert args.use_deepspeed and args.num_processes == 8
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert plugin.zero3_init_flag is True
    assert zero["offload_optimizer"]["device"] == "none" and zero["offload_param"]["device"] == "none"


@pytest.mark.parametrize("config, sharding", [
    (FSDP, ("FSDP v2: parameters, gradients and optimiser state split over ranks, one shard unit per decoder "
            "layer; rank 0 gathers the full state dict to save")),
    (ZERO3, ("DeepSpeed ZeRO-3: parameters, gradients and optimiser state partitioned over ranks; "
             "16-bit weights gathered on rank 0 to save")),
])
def test_leafe_launch_dry_run_prints_the_plan_and_the_exact_command(config, sharding):
    run = leafe("launch", config, "--dry-run", "--num-processes", 4, "--", *DISTILL)  # the installed CLI
    assert run.returncode == 0, run.stderr
    out = " ".join(run.stdout.split())  # a console may wrap long lines
    assert f"accelerate launch --config_file {config} --num_processes 4 -m leafe {' '.join(DISTILL)}" in out
    assert f"sharding {sharding}" in out
    assert "processes 4 on 1 machine(s), 4 per machine" in out and "precision bf16 autocast" in out
    assert "trains on one batch in 4" in out
    assert "rank 0 alone writes the model directory (/runs/leafe) and /runs/leafe/distill.json" in out


def test_dry_run_prints_the_command_as_its_last_line_and_launches_nothing(monkeypatch):
    import os

    monkeypatch.setattr(os, "execvpe", lambda *a: pytest.fail("a dry run launched"))
    result = launch(FSDP, "--dry-run", "--", *DISTILL)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[-1] == f"accelerate launch --config_file {FSDP} -m leafe {' '.join(DISTILL)}"
    assert lines[0] == f"config       {FSDP} (FSDP)"
    assert "processes    8 on 1 machine(s), 8 per machine" in lines


def test_without_dry_run_accelerate_replaces_the_process_with_the_planned_command(monkeypatch):
    import os

    seen = []
    monkeypatch.setattr(os, "execvpe", lambda program, argv, env: seen.append((program, argv, env)))
    result = launch(FSDP, "--num-processes", 2, "--", *DISTILL)
    assert result.exit_code == 0, result.output
    [(program, argv, env)] = seen
    assert env["LEAFE_SHARDING"] == "fsdp2" and "LEAFE_SHARDING" not in os.environ  # the ranks', not ours
    assert program == str(Path(sys.executable).parent / "accelerate")  # this environment's accelerate
    assert argv[1:] == ["launch", "--config_file", str(FSDP), "--num_processes", "2", "-m", "leafe", *DISTILL]


def test_multi_machine_overrides_go_on_the_command_line():
    plan = prepare_launch(FSDP, DISTILL, num_processes=16, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    assert plan.command == ["accelerate", "launch", "--config_file", str(FSDP), "--num_processes", "16",
                            "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1",
                            "-m", "leafe", *DISTILL]
    assert "processes    16 on 2 machine(s), 8 per machine" in plan.lines
    [machines] = [line for line in plan.lines if line.startswith("machines")]
    assert "own --machine-rank (0..1)" in machines and "rendezvous 10.0.0.1:29500" in machines


def test_data_parallel_and_deepspeed_file_configs_are_planned(tmp_path):
    plan = prepare_launch(DDP, DISTILL, num_processes=2)
    sharding = "sharding     none: data parallel (DDP), a full copy of the model per rank, gradients all-reduced"
    assert sharding in plan.lines
    ds_json = tmp_path / "ds.json"
    zero = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    ds_json.write_text(json.dumps({"zero_optimization": zero}))
    from_file = config_like(tmp_path, ZERO3, "dsfile", deepspeed_config={"deepspeed_config_file": str(ds_json)})
    assert prepare_launch(from_file, DISTILL).kind == "DEEPSPEED"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(LeafeError, match="zero_stage is 2; these configs are for ZeRO-3"):
        prepare_launch(from_file, DISTILL)


@pytest.mark.parametrize("config", [FSDP, ZERO3])
def test_grpo_under_sharded_weights_samples_from_a_whole_copy_synced_in_memory(config):
    result = launch(config, "--dry-run", "--", *GRPO)
    assert result.exit_code == 0, result.output
    plan = " ".join(result.stdout.split())
    assert "samples with its own whole copy (synced in memory after every step)" in plan
    vllm = launch(config, "--dry-run", "--", *GRPO, "--backend", "vllm")
    assert "samples with its own vLLM engine (synced in memory after every step)" in " ".join(vllm.stdout.split())


@pytest.mark.parametrize("config, sharding", [(FSDP, "fsdp2"), (ZERO3, "zero3"), (DDP, "ddp")])
def test_every_rank_is_told_the_sharding_its_launch_asked_for(config, sharding):
    assert prepare_launch(config, DISTILL).sharding == sharding
    # one process shards nothing under DDP; an FSDP or ZeRO-3 config still asks its rank for that sharding
    assert prepare_launch(config, DISTILL, num_processes=1).sharding == ("none" if config == DDP else sharding)


def test_grpo_runs_data_parallel_each_rank_sampling_its_share_of_the_tasks():
    plan = prepare_launch(DDP, [*GRPO, "--tasks-per-step", "16"], num_processes=4)
    assert plan.command[-len(GRPO) - 2:] == [*GRPO, "--tasks-per-step", "16"]
    each_rank = "each rank    samples with the policy itself on 4 of the 16 tasks of a step"
    assert any(line.startswith(each_rank) for line in plan.lines)
    assert "output       rank 0 alone writes /runs/grpo: log.jsonl (the whole step), checkpoints, the model, " \
           "train.json" in plan.lines
    with pytest.raises(LeafeError, match=r"--tasks-per-step \(8\) must be a multiple of the 3 processes"):
        prepare_launch(DDP, GRPO, num_processes=3)
    with pytest.raises(LeafeError, match="leafe train ace runs in one process"):
        prepare_launch(DDP, ["train", "ace", "--model", "m", "--out", "o"], num_processes=2)


def test_what_cannot_run_is_refused_in_one_line(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("distributed_type: [FSDP\n")
    cases = [
        ([tmp_path / "none.yaml", "--dry-run", "--", *DISTILL], "none.yaml does not exist"),
        ([bad_yaml, "--dry-run", "--", *DISTILL], "bad.yaml is not an accelerate config"),
        ([config_like(tmp_path, FSDP, "typo", **{"fsdp_config.fsdp_reshard_after_forwrd": True}), "--dry-run", "--",
          *DISTILL], "fsdp_config.fsdp_reshard_after_forwrd is not an option accelerate launch knows"),
        ([config_like(tmp_path, ZERO3, "stage2", **{"deepspeed_config.zero_stage": 2}), "--dry-run", "--", *DISTILL],
         "zero_stage is 2; these configs are for ZeRO-3"),
        ([config_like(tmp_path, ZERO3, "nogather", **{"deepspeed_config.zero3_save_16bit_model": False}), "--dry-run",
          "--", *DISTILL], "set zero3_save_16bit_model: true"),
        ([config_like(tmp_path, FSDP, "sharded", **{"fsdp_config.fsdp_state_dict_type": "SHARDED_STATE_DICT"}),
          "--dry-run", "--", *DISTILL], "fsdp_state_dict_type must be FULL_STATE_DICT"),
        ([config_like(tmp_path, FSDP, "npu", distributed_type="MULTI_NPU"), "--dry-run", "--", *DISTILL],
         "distributed_type MULTI_NPU is not planned for"),
        ([config_like(tmp_path, FSDP, "cpu", distributed_type="MULTI_CPU", fsdp_config=None), "--dry-run",
          "--num-processes", 2, "--", *DISTILL], "accelerate launch starts 1 process, not 2, for MULTI_CPU"),
        ([config_like(tmp_path, FSDP, "one", distributed_type="NO", fsdp_config=None), "--dry-run", "--num-processes",
          2, "--", *DISTILL], "is a one-process config (distributed_type NO)"),
        ([FSDP, "--dry-run", "--num-processes", 9, "--num-machines", 2, "--main-process-ip", "10.0.0.1", "--",
          *DISTILL], "9 does not split evenly over 2 machines"),
        ([FSDP, "--dry-run", "--machine-rank", 1, "--", *DISTILL], "--machine-rank must be in [0, 0] (got 1)"),
        ([FSDP, "--dry-run", "--num-processes", 16, "--num-machines", 2, "--", *DISTILL], "needs --main-process-ip"),
        ([FSDP, "--dry-run", "--num-processes", 0, "--", *DISTILL], "needs >= 1 process and machine"),
        ([FSDP, "--dry-run"], "nothing to launch"),
        ([FSDP, "--dry-run", "--", "eval", "--model", "m"], "leafe eval is not a training command"),
    ]
    for args, message in cases:
        result = launch(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.stderr.split()), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) <= 3  # one message, wrapped at most by the console


def test_a_deepspeed_launch_without_deepspeed_installed_says_what_to_install(monkeypatch):
    import importlib.util
    import os

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    monkeypatch.setattr(os, "execvpe", lambda *a: pytest.fail("launched without deepspeed"))
    dry = launch(ZERO3, "--dry-run", "--", *DISTILL)
    assert dry.exit_code == 0 and "needs        deepspeed, not installed in this environment" in dry.stdout
    result = launch(ZERO3, "--", *DISTILL)
    assert result.exit_code == 2 and "a DeepSpeed config needs deepspeed: pip install deepspeed" in result.stderr


@pytest.mark.slow
def test_two_ranks_split_the_batches_and_write_one_loadable_model(trees_file, tiny_model_dir, tmp_path):  # noqa: F811
    """The launch path for real on CPU: a MULTI_GPU config makes accelerate start 2 ranks with torchrun;
    without CUDA the Trainer joins them over gloo (DDP). Each rank trains on every other batch, rank 0
    gathers and writes the model and distill.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from leafe.methods.distill import build_rows
    from leafe.methods.sft import make_batches
    from leafe.settings import DistillSettings
    from leafe.trees import read_trees

    config = two_rank_config(tmp_path / "ddp2.yaml")
    out = tmp_path / "distilled"
    run = subprocess.run([sys.executable, "-m", "leafe", "launch", str(config), "--", "distill", "--model",
                          str(tiny_model_dir), "--trees", str(trees_file), "--out", str(out), "--epochs", "1",
                          "--lr", "1e-4", "--reh-fraction", "1"], check=False, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows, _ = build_rows(read_trees(trees_file), DistillSettings(reh_fraction=1))
    limit = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    batches = make_batches([len(r.input_ids) for r in rows if len(r.input_ids) <= limit], 8, 8192, 0)  # CLI defaults
    summary = json.loads((out / "distill.json").read_text())
    assert len(batches) >= 4 and summary["training"]["steps"] == math.ceil(len(batches) / 2)  # one process: all
    trained = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for (n, a), (_, b) in zip(trained.named_parameters(), start.named_parameters()) if not a.equal(b)]
    assert changed  # the weights were trained and saved


def test_a_rank_leaves_with_its_commands_exit_code_and_output(tmp_path):
    """A launched rank ends without interpreter teardown (`leave_launch`), which must keep what the
    command printed and its exit code: 0 for a success, 2 for a one-line error or a usage error."""
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2"}

    def rank(*args):
        return subprocess.run([sys.executable, "-m", "leafe", *args], check=False, capture_output=True, text=True,
                              env=env, timeout=120)

    helped = rank("distill", "--help")
    assert helped.returncode == 0 and "LEAFE stage 2" in helped.stdout
    missing = rank("report", str(tmp_path))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1 and str(tmp_path) in missing.stderr
    assert rank("distill", "--no-such-flag").returncode == 2


def test_accelerate_starts_one_process_for_multi_cpu_without_mpirun(tmp_path):
    """Why leafe launch refuses such a config: accelerate's simple launcher ignores num_processes."""
    config = tmp_path / "cpu2.yaml"
    config.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_CPU", "mixed_precision": "no",
        "num_machines": 1, "num_processes": 2, "machine_rank": 0, "use_cpu": True}))
    script = tmp_path / "rank.py"
    script.write_text("import os\nprint('rank', os.environ.get('RANK', '-'), 'of', "
                      "os.environ.get('WORLD_SIZE', '-'))\n")
    accelerate = Path(sys.executable).parent / "accelerate"
    run = subprocess.run([str(accelerate), "launch", "--config_file", str(config), str(script)], check=False,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == ["rank - of -"]  # one process, not two


@pytest.mark.slow
def test_two_ranks_train_grpo_on_their_own_tasks_and_log_each_step_once(tiny_model_dir, tmp_path):
    config = two_rank_config(tmp_path / "ddp2.yaml")
    out = tmp_path / "grpo"
    run = subprocess.run([sys.executable, "-m", "leafe", "launch", str(config), "--", "train", "grpo",
                          "--model", str(tiny_model_dir), "--out", str(out), "--tasks", "4", "--task-seed", "40",
                          "--max-new-tokens", "8", "--env-param", "max_steps=4", "--steps", "3", "--tasks-per-step",
                          "2", "--group-size", "4", "--invalid-penalty", "0.1", "--save-every", "1",
                          "--device", "cpu"],
                         check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]  # rank 0 writes each step once
    assert all(r["groups"] == 2 and r["env_steps"] == 2 * 4 * 4 for r in log)  # both ranks' tasks, merged
    assert json.loads((out / "train.json").read_text())["data"]["episodes"] == 3 * 2 * 4
