"""`leafe launch CONFIG -- COMMAND ...`: run a leafe training command under `accelerate launch`.

The configs in `configs/accelerate/` (FSDP, DeepSpeed ZeRO-3) spread one training job over many GPUs
and machines. This module checks such a config with accelerate's own loader, checks that the leafe
command can run on several processes, and prints the plan and the exact `accelerate launch` line
(`--dry-run` stops there).

What runs multi-process today is LEAFE stage 2, `leafe distill`: every rank reads the trees and builds
the same rows (deterministic), TRL's SFTTrainer (transformers' Trainer on accelerate) gives each rank
its share of the batches, shards the model as the config says, and gathers the weights on rank 0 to
save an ordinary model directory. `leafe train` is refused with the reason: GRPO samples its episodes
in process with its own decode loop over the policy it updates, so each rank would sample every task
(the schedule is not rank-aware) and, with sharded weights, ranks making different numbers of
forward calls would wait on each other forever; Early Experience samples its rows before its SFT on
every rank alike; ACE trains no weights.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from leafe.errors import LeafeError

#: accelerate's distributed types this module plans for.
SUPPORTED = ("FSDP", "DEEPSPEED", "MULTI_GPU", "MULTI_CPU", "NO")


@dataclass
class LaunchPlan:
    command: list[str]
    lines: list[str] = field(default_factory=list)

    def shell(self) -> str:
        return shlex.join(self.command)


def load_accelerate_config(path: str | Path):
    """The config as accelerate reads it (`accelerate launch --config_file` uses the same loader)."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(path)
    if not path.is_file():
        raise LeafeError(f"accelerate config {path} does not exist; use one of configs/accelerate/*.yaml")
    try:
        return load_config_from_file(str(path))
    except Exception as exc:  # noqa: BLE001 (yaml, dataclass and enum errors all mean a bad file)
        raise LeafeError(f"{path} is not an accelerate config: {type(exc).__name__}: {exc}") from None


def launch_plan(config_file: str | Path, args: list[str], *, num_processes: int | None = None,
                num_machines: int | None = None, machine_rank: int | None = None,
                main_process_ip: str | None = None) -> LaunchPlan:
    """The `accelerate launch` command for `leafe ARGS` under `config_file`, with what each rank does."""
    config = load_accelerate_config(config_file)
    kind = getattr(config.distributed_type, "value", str(config.distributed_type))
    if kind not in SUPPORTED:
        raise LeafeError(f"{config_file}: distributed_type {kind} is not planned for; use {', '.join(SUPPORTED)}")
    processes = num_processes if num_processes is not None else config.num_processes
    machines = num_machines if num_machines is not None else config.num_machines
    if processes < 1 or machines < 1:
        raise LeafeError(f"the launch needs >= 1 process and machine (got {processes} processes, {machines} machines)")
    if machines > 1 and not (main_process_ip or config.main_process_ip):
        raise LeafeError("a launch over several machines needs --main-process-ip (rank 0's address)")
    sharding = _sharding(config, kind, config_file)
    if not args:
        raise LeafeError("nothing to launch: give the leafe command after --, e.g. -- distill --model M --trees T --out O")
    if args[0] == "train":
        raise LeafeError("leafe train runs in one process: GRPO samples from the policy it updates in process (each "
                         "rank would sample every task, and sharded ranks would hang on unequal forward calls); "
                         "multi-GPU launch is for `leafe distill`")
    if args[0] != "distill":
        raise LeafeError(f"leafe {args[0]} is not a training command; multi-GPU launch is for `leafe distill`")
    if "--lora" in args and kind in ("FSDP", "DEEPSPEED"):
        raise LeafeError("--lora merges adapters into the weights on save, which sharded weights do not allow; "
                         "distil without --lora under FSDP/ZeRO-3 (or launch with a MULTI_GPU config)")

    command = ["accelerate", "launch", "--config_file", str(config_file)]
    for flag, value, default in (("--num_processes", num_processes, None), ("--num_machines", num_machines, None),
                                 ("--machine_rank", machine_rank, None), ("--main_process_ip", main_process_ip, None)):
        if value is not default:
            command += [flag, str(value)]
    command += ["-m", "leafe", *args]
    per_machine = max(processes // machines, 1)
    lines = [
        f"config       {config_file} ({kind})",
        f"processes    {processes} on {machines} machine(s), {per_machine} per machine",
        f"sharding     {sharding}",
        f"precision    {config.mixed_precision}",
        "each rank    reads the trees, builds the same rows (deterministic), trains on its share of the batches",
        f"batch        effective batch = {processes} x the batch of one process (--batch-size rows)",
        f"output       rank 0 writes the model directory ({_out_dir(args) or '--out'}) and distill.json",
    ]
    return LaunchPlan(command, lines)


def _sharding(config, kind: str, path) -> str:
    if kind == "FSDP":
        fsdp = config.fsdp_config or {}
        if fsdp.get("fsdp_state_dict_type", "FULL_STATE_DICT") != "FULL_STATE_DICT":
            raise LeafeError(f"{path}: fsdp_state_dict_type must be FULL_STATE_DICT, so the saved model is a loadable "
                             f"directory, not per-rank shards")
        return (f"FSDP v{fsdp.get('fsdp_version', 1)}: parameters, gradients and optimiser state split over ranks, "
                f"wrapped per decoder layer ({fsdp.get('fsdp_auto_wrap_policy', 'default')})")
    if kind == "DEEPSPEED":
        ds = config.deepspeed_config or {}
        if ds.get("deepspeed_config_file"):
            return f"DeepSpeed, settings in {ds['deepspeed_config_file']}"
        if int(ds.get("zero_stage", 0)) != 3:
            raise LeafeError(f"{path}: zero_stage is {ds.get('zero_stage')}; these configs are for ZeRO-3 "
                             f"(zero_stage: 3)")
        if str(ds.get("zero3_save_16bit_model", "false")).lower() != "true":
            raise LeafeError(f"{path}: set zero3_save_16bit_model: true, or the saved model is partitioned")
        return "DeepSpeed ZeRO-3: parameters, gradients and optimiser state partitioned over ranks"
    if kind in ("MULTI_GPU", "MULTI_CPU"):
        return "none: data parallel, a full copy of the model per rank, gradients all-reduced"
    return "none: one process"


def _out_dir(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a == "--out" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    return None


def run(plan: LaunchPlan) -> None:
    """Replace this process with the launch (accelerate starts and watches the ranks), using the
    `accelerate` of this Python's environment when there is one."""
    beside = Path(sys.executable).parent / "accelerate"
    program = str(beside) if beside.exists() else plan.command[0]
    os.execvp(program, [program, *plan.command[1:]])
