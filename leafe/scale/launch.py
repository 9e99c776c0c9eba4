"""`leafe launch CONFIG -- COMMAND ...`: run a leafe training command under `accelerate launch`.

The built-in configs `ddp`, `fsdp` and `zero3` (DDP, FSDP, DeepSpeed ZeRO-3: leafe/configs/accelerate/,
`leafe launch fsdp`), or any accelerate config file, spread one training job over many GPUs and
machines. This module checks such a config the way `accelerate launch` will read it (accelerate's
own loader; every fsdp_config / deepspeed_config key must be one accelerate knows, since it ignores
the others silently), checks that the leafe command can run on several processes, and prints what
each rank will do and the exact `accelerate launch` line (`--dry-run` stops there).

Two commands run multi-process. LEAFE stage 2, `leafe distill`: every rank reads the trees and builds
the same rows (deterministic), TRL's SFTTrainer (transformers' Trainer on accelerate) gives each rank
one batch in N, shards the model as the config says, and gathers the weights on rank 0, which alone
writes the model directory and distill.json. Tested: 2 real ranks (torchrun, gloo on CPU) split the
batches and write one loadable model. An FSDP (version 2) config shards on CPU processes too, through
accelerate's own FSDP2 code (`leafe.methods.distributed`; tested on 2 gloo ranks); ZeRO-3 needs GPUs.

`leafe train grpo`: each rank samples its share of the step's tasks (with its own copy of the
policy, or with `--backend vllm` its own engine, given the new weights in memory after every step),
the ranks meet in the gradient collectives of each optimiser step, and rank 0 writes the log,
checkpoints and model. Under FSDP a rank never samples from the sharded policy (every decode step
would be a collective that ranks reach unequally): the hf engine is then a whole copy of its own.
Early Experience and ACE run in one process here (a study launches Early Experience's SFT itself:
`leafe.scale.stage`).

The run lock (`leafe.lock`): `leafe launch` takes none itself, since it becomes accelerate's launcher
(exec) and could not release it. Rank 0, the one writer, takes the --out directory's lock as the
command it runs; the other ranks, on every machine, take none. A launch started inside a locked run
inherits its LEAFE_RUN_LOCK with the rest of the environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from leafe import configs as builtin_configs
from leafe.errors import LeafeError
from leafe.methods.distributed import SHARDING_ENV

#: accelerate's distributed types a launch may use.
SUPPORTED = ("FSDP", "DEEPSPEED", "MULTI_GPU", "MULTI_CPU", "NO")

#: What `leafe launch` needs from typer: everything after the options goes to the leafe command.
LAUNCH_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}

@dataclass
class Launch:
    """A checked launch: the `accelerate launch` line and what each rank will do."""

    command: list[str]  # the `accelerate launch ...` argv
    kind: str  # accelerate's distributed_type
    lines: list[str] = field(default_factory=list)  # what the launch does, one aligned line each
    sharding: str = "ddp"  # what every rank must report it ran (`leafe.methods.distributed.ran`)

    def shell(self) -> str:
        return shlex.join(self.command)


def load_accelerate_config(path: str | Path):
    """The config as accelerate reads it (`accelerate launch --config_file` uses the same loader); `path`
    is a file or the name of a built-in accelerate config (`leafe configs`)."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = builtin_configs.resolve(path, "accelerate")  # a file, or the name of one that ships with leafe
    try:
        config = load_config_from_file(str(path))
    except Exception as exc:  # noqa: BLE001 (yaml, dataclass and enum errors all mean a bad file)
        message = " ".join(str(exc).split())
        raise LeafeError(f"{path} is not an accelerate config: {type(exc).__name__}: {message}") from None
    _check_known_keys(config, path)
    return config


def _check_known_keys(config, path: Path) -> None:
    """accelerate launch copies each fsdp_config / deepspeed_config entry onto its own options and
    ignores names it has no option for: a misspelt key would silently fall back to a default."""
    from accelerate.commands.launch import launch_command_parser

    known = {action.dest for action in launch_command_parser()._actions}
    for section, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
        for key in getattr(config, section, None) or {}:
            name = key if key.startswith(prefix) else prefix + key
            if name not in known:
                raise LeafeError(f"{path}: {section}.{key} is not an option accelerate launch knows (it would be "
                                 f"ignored); see `accelerate launch --help`")


def prepare_launch(config_file: str | Path, args: list[str], *, num_processes: int | None = None,
                   num_machines: int | None = None, machine_rank: int | None = None,
                   main_process_ip: str | None = None) -> Launch:
    """The `accelerate launch` command for `leafe ARGS` under `config_file`, with what each rank does.

    The overrides go on the command line (they win over the config there too); the checks are the
    ones that would otherwise fail late, on every rank, or not at all.
    """
    config_file = builtin_configs.resolve(config_file, "accelerate")  # the file the printed command names
    config = load_accelerate_config(config_file)
    kind = getattr(config.distributed_type, "value", str(config.distributed_type))
    if kind not in SUPPORTED:
        raise LeafeError(f"{config_file}: distributed_type {kind} is not planned for; use {', '.join(SUPPORTED)}")
    processes = num_processes if num_processes is not None else config.num_processes
    machines = num_machines if num_machines is not None else config.num_machines
    rank = machine_rank if machine_rank is not None else config.machine_rank
    address = main_process_ip or config.main_process_ip
    if processes < 1 or machines < 1:
        raise LeafeError(f"the launch needs >= 1 process and machine (got {processes} processes, {machines} machines)")
    if processes % machines:
        raise LeafeError(f"--num-processes counts the processes of all machines: {processes} does not split evenly "
                         f"over {machines} machines")
    if not 0 <= rank < machines:
        raise LeafeError(f"--machine-rank must be in [0, {machines - 1}] (got {rank})")
    if machines > 1 and not address:
        raise LeafeError("a launch over several machines needs --main-process-ip (rank 0's address)")
    if kind == "NO" and processes > 1:
        raise LeafeError(f"{config_file} is a one-process config (distributed_type NO); use a MULTI_GPU, FSDP or "
                         f"DEEPSPEED config for {processes} processes")
    if kind == "MULTI_CPU" and processes > 1 and not (config.mpirun_config or {}).get("mpirun_hostfile"):
        # accelerate's simple launcher starts one process for MULTI_CPU unless it goes through mpirun
        raise LeafeError(f"{config_file}: accelerate launch starts 1 process, not {processes}, for MULTI_CPU without "
                         f"mpirun_config.mpirun_hostfile (Intel MPI); use a MULTI_GPU config")
    sharding = _sharding(config, kind, config_file)
    if not args:
        raise LeafeError("nothing to launch: give the leafe command after --, e.g. "
                         "-- distill --model M --trees T --out O")
    command = _command(config_file, args, num_processes, num_machines, machine_rank, main_process_ip)
    header = [f"config       {config_file} ({kind})",
              f"processes    {processes} on {machines} machine(s), {processes // machines} per machine",
              f"sharding     {sharding}"]
    if args[0] == "train":
        return Launch(command, kind, header + _grpo_lines(kind, args, processes, machines, address),
                          _ran_as(config, kind, processes))
    if args[0] != "distill":
        raise LeafeError(f"leafe {args[0]} is not a training command; multi-GPU launch is for `leafe distill` "
                         f"and `leafe train grpo`")

    out = _option(args, "--out") or "--out"
    lines = [
        *header,
        f"precision    {_precision(config.mixed_precision)}",
        (f"each rank    reads the trees and builds the same rows (deterministic), trains on one batch in {processes}"
         if processes > 1 else "one rank     reads the trees, builds the rows, trains on every batch"),
        (f"batch        {processes} x --batch-size rows per optimiser step; 1/{processes} of the steps of one "
         f"process; --lr is not rescaled"),
        f"output       rank 0 alone writes the model directory ({out}) and {out}/distill.json",
    ]
    if processes > 1:
        lines.append(f"host memory  each process loads the whole model in fp32 on the CPU before it is placed or "
                     f"sharded: 4 bytes x parameters x {processes // machines} per machine")
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        lines.append("needs        deepspeed, not installed in this environment (pip install deepspeed)")
    if machines > 1:
        port = config.main_process_port or 29500
        lines.append(f"machines     run this command on each machine with its own --machine-rank (0..{machines - 1});"
                     f" rendezvous {address}:{port}; --model and --trees at the same path everywhere, "
                     f"the output lands on machine 0")
    return Launch(command, kind, lines, _ran_as(config, kind, processes))


def _ran_as(config, kind: str, processes: int) -> str:
    """The sharding every rank of this launch must report (`leafe.methods.distributed.ran`)."""
    if kind == "FSDP":
        return f"fsdp{(config.fsdp_config or {}).get('fsdp_version', 1)}"
    if kind == "DEEPSPEED":
        return "zero3"
    return "ddp" if processes > 1 else "none"


def _command(config_file, args, num_processes, num_machines, machine_rank, main_process_ip) -> list[str]:
    command = ["accelerate", "launch", "--config_file", str(config_file)]
    for flag, value in (("--num_processes", num_processes), ("--num_machines", num_machines),
                        ("--machine_rank", machine_rank), ("--main_process_ip", main_process_ip)):
        if value is not None:
            command += [flag, str(value)]
    return command + ["-m", "leafe", *args]


def _grpo_lines(kind, args, processes, machines, address) -> list[str]:
    """GRPO runs data parallel: a full copy per rank, each rank sampling its share of the step's tasks."""
    method = args[1] if len(args) > 1 else None
    if method != "grpo":
        raise LeafeError(f"leafe train {method} runs in one process; multi-GPU launch is for `leafe distill` "
                         f"and `leafe train grpo`")
    from leafe.methods.grpo import check_tasks_per_step
    from leafe.settings import GRPOSettings

    engine = _option(args, "--backend") or "hf"
    per_step = int(_option(args, "--tasks-per-step") or GRPOSettings().tasks_per_step)
    check_tasks_per_step(per_step, processes)
    out = _option(args, "--out") or "--out"
    sampler = ("its own vLLM engine (synced in memory after every step)" if engine == "vllm" else
               "its own whole copy (synced in memory after every step)" if kind in ("FSDP", "DEEPSPEED")
               else "the policy itself")
    lines = [
        (f"each rank    samples with {sampler} on {per_step // processes} of the {per_step} tasks of a step "
         f"(--group-size episodes each), then trains on them"),
        ("sync         gradients reduce-scattered after every micro-batch (every rank runs as many)" if kind == "FSDP"
         else "sync         one gradient all-reduce per optimiser step") + "; the loss is the token mean over all "
        "ranks' samples",
        f"output       rank 0 alone writes {out}: log.jsonl (the whole step), checkpoints, the model, train.json",
    ]
    if machines > 1:
        lines.append(f"machines     run this command on each machine with its own --machine-rank (0..{machines - 1}); "
                     f"rendezvous {address}; --model at the same path everywhere and --out on a filesystem every "
                     f"machine sees (every rank reads its checkpoints to resume)")
    return lines


def _sharding(config, kind: str, path) -> str:
    if kind == "FSDP":
        fsdp = config.fsdp_config or {}
        if fsdp.get("fsdp_state_dict_type", "FULL_STATE_DICT") != "FULL_STATE_DICT":
            raise LeafeError(f"{path}: fsdp_state_dict_type must be FULL_STATE_DICT, so the saved model is a loadable "
                             f"directory, not per-rank shards")
        wrap = fsdp.get("fsdp_auto_wrap_policy", "NO_WRAP")
        unit = "one shard unit per decoder layer" if wrap == "TRANSFORMER_BASED_WRAP" else f"wrap policy {wrap}"
        return (f"FSDP v{fsdp.get('fsdp_version', 1)}: parameters, gradients and optimiser state split over ranks, "
                f"{unit}; rank 0 gathers the full state dict to save")
    if kind == "DEEPSPEED":
        ds = config.deepspeed_config or {}
        if ds.get("deepspeed_config_file"):
            stage, gather = _deepspeed_file_settings(Path(ds["deepspeed_config_file"]), path)
        else:
            stage, gather = ds.get("zero_stage"), ds.get("zero3_save_16bit_model", False)
        if str(stage) != "3":
            raise LeafeError(f"{path}: zero_stage is {stage}; these configs are for ZeRO-3 (zero_stage: 3)")
        if str(gather).lower() != "true":
            raise LeafeError(f"{path}: set zero3_save_16bit_model: true, or the saved model is partitioned")
        return ("DeepSpeed ZeRO-3: parameters, gradients and optimiser state partitioned over ranks; "
                "16-bit weights gathered on rank 0 to save")
    if kind in ("MULTI_GPU", "MULTI_CPU"):
        return "none: data parallel (DDP), a full copy of the model per rank, gradients all-reduced"
    return "none: one process"


def _deepspeed_file_settings(file: Path, config_path) -> tuple[Any, Any]:
    """(stage, gather-16-bit-on-save) from a DeepSpeed JSON named by deepspeed_config_file."""
    try:
        zero = json.loads(file.read_text()).get("zero_optimization", {})
    except (OSError, json.JSONDecodeError) as exc:
        raise LeafeError(f"{config_path}: deepspeed_config_file {file} cannot be read ({exc})") from None
    return zero.get("stage"), zero.get("stage3_gather_16bit_weights_on_model_save", False)


def _precision(mixed: Any) -> str:
    mixed = getattr(mixed, "value", mixed)
    if mixed == "bf16":
        return "bf16 autocast over fp32 master weights"
    return f"{mixed} (leafe's SFT still turns bf16 on for any GPU that supports it)"


def _option(args: list[str], name: str) -> str | None:
    """The value of `name` in a leafe command line (`--name value` or `--name=value`)."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def run(launch: Launch) -> None:
    """Replace this process with the launch (accelerate starts and watches the ranks), using the
    `accelerate` of this Python's environment when there is one."""
    if launch.kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise LeafeError("a DeepSpeed config needs deepspeed: pip install deepspeed "
                         "(or use the built-in fsdp: `leafe launch fsdp ...`)")
    beside = Path(sys.executable).parent / "accelerate"
    program = str(beside) if beside.exists() else launch.command[0]
    sys.stdout.flush()
    # every rank checks it got this sharding (`leafe.methods.distributed.check_ran`): never silently
    # unsharded; the environment carries a holder's LEAFE_RUN_LOCK to the ranks (`leafe.lock`)
    os.execvpe(program, [program, *launch.command[1:]], {**os.environ, SHARDING_ENV: launch.sharding})


# Registered in cli.py as `app.command("launch", context_settings=LAUNCH_CONTEXT)(_cli_errors(launch_cmd))`:
# the arguments after `--` reach the function as `ctx.args`; LeafeError becomes a one-line error, exit 2.
def launch_cmd(
    ctx: typer.Context,
    config: Annotated[str, typer.Argument(help="An accelerate config: a YAML file, or the name of a built-in one: "
                                               "ddp, fsdp, zero3 (`leafe configs`; a file wins over a name).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and the command; launch nothing.")] = False,
    num_processes: Annotated[int | None, typer.Option(help="Processes, all machines (overrides the config).")] = None,
    num_machines: Annotated[int | None, typer.Option(help="Machines (overrides the config).")] = None,
    machine_rank: Annotated[int | None, typer.Option(help="This machine's rank (multi-machine).")] = None,
    main_process_ip: Annotated[str | None, typer.Option(help="Rank 0's address (multi-machine).")] = None,
) -> None:
    """Run a training command on many GPUs: `leafe launch CONFIG [--dry-run] -- distill --model ...`."""
    launch = prepare_launch(config, list(ctx.args), num_processes=num_processes, num_machines=num_machines,
                            machine_rank=machine_rank, main_process_ip=main_process_ip)
    for line in launch.lines:
        print(line)
    print(launch.shell())  # one line, never wrapped: copy it to run the launch by hand
    if not dry_run:
        run(launch)
