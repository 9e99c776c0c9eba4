"""The accelerator every training loop runs on (GRPO's, and the SFT trainer's under distillation,
Early Experience and the bootstrap), the weights it trains as whole tensors, and the record of what
actually ran.

A launch says how to shard the way `accelerate launch` tells each rank: environment variables
(ACCELERATE_USE_FSDP and the FSDP_* options, ACCELERATE_USE_DEEPSPEED, ACCELERATE_MIXED_PRECISION).
On GPUs accelerate acts on them itself. On CPU processes it does not: its state maps every CPU
launch to MULTI_CPU (data parallel over gloo) and drops the FSDP plugin, without a word. Yet torch's
FSDP2 (`fully_shard`) runs on a CPU device mesh over gloo, and accelerate's FSDP2 path
(`fsdp2_prepare_model`, the full-state-dict gathering, `save_state` / `load_state`, clipping) calls
nothing CUDA-only. What stands between the two is one branch of `AcceleratorState.__init__`. So on
CPU leafe makes the accelerator as usual, then sets its state to FSDP with the plugin accelerate
built from the same variables (`_shard_on_cpu`): from there on, every call is accelerate's own FSDP2
code, the code a GPU run executes. Nothing is substituted: a rank that asked for sharding and did
not get it stops with one line (`check_ran`).

DeepSpeed ZeRO-3 is not taken this way: DeepSpeed 0.19 itself trains ZeRO-3 on gloo CPU processes
(docs/scaling.md; BENCHMARKS.md, "Sharded training"), but its engine owns the optimiser step and a
fixed number of micro-batches per step, which GRPO's loop varies; so zero3 is refused on CPU
processes, in one line.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

from leafe.errors import LeafeError

if TYPE_CHECKING:  # torch loads only when a training stage runs (`leafe run --dry-run` never loads it)
    import torch

#: What a launcher asked each rank for (fsdp2, zero3, ddp): set by `leafe.scale.stage`, checked by `check_ran`.
SHARDING_ENV = "LEAFE_SHARDING"


def requested_sharding() -> str:
    """The sharding this process was launched with: fsdp2 / fsdp1 / zero3 from accelerate's
    variables, ddp for a plain multi-process launch, none for one process."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return f"fsdp{os.environ.get('FSDP_VERSION', '1')}"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "zero3"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"


def sharded_launch() -> bool:
    """Whether the weights of this launch are split over the processes (FSDP or ZeRO-3)."""
    return requested_sharding() not in ("ddp", "none")


def mixed_precision(requested: str | None = None) -> str:
    """'bf16' or 'no' for this machine: `requested` (auto / bf16 / no), else what accelerate launch
    passed (ACCELERATE_MIXED_PRECISION), else auto: bf16 on GPUs that support it, fp32 elsewhere.
    bf16 on a CPU is honoured: its autocast runs the matmuls in bf16 (fp32 master weights)."""
    import torch

    value = (requested or os.environ.get("ACCELERATE_MIXED_PRECISION") or "auto").lower()
    cuda = torch.cuda.is_available()
    if value == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if value not in ("bf16", "no"):
        raise LeafeError(f"mixed precision {value!r} is not one leafe trains in; use bf16, no or auto")
    if value == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise LeafeError("mixed_precision: bf16 needs a GPU with bf16 (Ampere or newer); use mixed_precision: no")
    return value


def make_accelerator(precision: str | None = None, **kwargs: Any):
    """The Accelerator of a training loop, sharded as launched, on GPUs and on CPU processes alike.

    Made once per process: accelerate's state is process-wide, so the SFT trainer's own Accelerator
    (transformers') finds this state and reuses it."""
    import torch
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    wanted = requested_sharding()
    if wanted == "zero3" and not cuda:
        raise LeafeError("training.sharding: zero3 is not wired for CPU processes (its engine fixes the micro-batches "
                         "per step that GRPO varies; docs/scaling.md); use sharding: fsdp")
    if wanted == "fsdp1" and not cuda:
        raise LeafeError("FSDP version 1 does not shard on CPU processes; set fsdp_version: 2 in the accelerate config")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process may train several times (a study's stages, the tests) and in other precisions:
        # accelerate's process-wide state would refuse a second precision, so each training starts anew.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=not cuda, mixed_precision=mixed_precision(precision), **kwargs)
    if wanted.startswith("fsdp") and not cuda and accelerator.num_processes > 1:
        _shard_on_cpu(accelerator)
    check_ran(accelerator)
    return accelerator


def _shard_on_cpu(accelerator) -> None:
    """Give a CPU run the FSDP state accelerate gives a GPU run (see the module docstring)."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = AcceleratorState()
    if state.distributed_type == DistributedType.FSDP:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as accelerate itself reads them
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def ran(accelerator) -> dict[str, Any]:
    """What a training stage ran on: processes (and machines), the sharding applied (fsdp2, fsdp1,
    zero3, ddp, none), the mixed precision and the device type."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        sharding = f"fsdp{accelerator.state.fsdp_plugin.fsdp_version}"
    elif kind == DistributedType.DEEPSPEED:
        sharding = f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    elif accelerator.num_processes > 1:
        sharding = "ddp"
    else:
        sharding = "none"
    machines = int(os.environ.get("WORLD_SIZE", "1")) // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return {"processes": accelerator.num_processes, "machines": max(machines, 1), "sharding": sharding,
            "mixed_precision": accelerator.mixed_precision, "device": accelerator.device.type}


def check_ran(accelerator) -> None:
    """Stop a rank whose launch asked for a sharding it did not get (e.g. an FSDP config that would
    run as plain data parallel): one line naming both."""
    asked = os.environ.get(SHARDING_ENV)
    if asked is None:
        return
    got = ran(accelerator)["sharding"]
    if got != asked:
        raise LeafeError(f"the launch asked for {asked} and accelerate set up {got}: refusing to train unsharded; "
                         f"check the accelerate config (distributed_type, fsdp_version) or set training.sharding")


# -- the weights as whole tensors -----------------------------------------------------------------

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.[^.]+\.weight$")


def leave_launch(code: int) -> NoReturn:
    """End a rank of a multi-process launch with `code` once its command is done.

    The ranks first meet (after a success only: a failed rank is ended by the launcher), so none leaves
    while rank 0 still writes what the others trained. Then the process ends without interpreter
    teardown: destroying a gloo process group's objects at exit can deadlock on the GIL (a DDP model's
    ~Reducer joins a gloo thread; grpo.run._KEPT_UNTIL_EXIT) or abort ("terminate called without an active
    exception": a gloo thread freed unjoined), and either fails a launch whose outputs are complete."""
    if code == 0 and "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def merge_lora(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A PEFT model's whole state dict -> the plain model's, with W + scaling * B @ A in each adapted
    layer (PEFT's own merge for standard LoRA), under the base model's names. Pure: works on the
    gathered tensors of a sharded run as on an unsharded one."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("base_model.model.")
        if match := _LORA.match(key):
            parts.setdefault(match["module"], {})[match["part"]] = value
        elif ".base_layer." in key:
            out[key.replace(".base_layer.", ".")] = value
        else:
            out[key] = value
    for module, ab in parts.items():
        weight = module + ".weight"
        delta = (ab["B"].float() @ ab["A"].float()) * scaling
        out[weight] = (out[weight].float() + delta).to(out[weight].dtype)
    return out


def without_tied_head(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """`state` without the output head's weight when the model ties it to the input embeddings: a
    gathered FSDP state holds it as a copy of its own, and the saved directory must be the plain
    model's (the head is tied again on loading)."""
    config = model.config.get_text_config()
    if not getattr(config, "tie_word_embeddings", False):
        return state
    head = model.get_output_embeddings()
    tied = {f"{name}.weight" for name, module in model.named_modules() if module is head}
    return {k: v for k, v in state.items() if k not in tied}


def lora_scaling(model) -> float | None:
    """alpha / r of a PEFT model's default adapter (None without adapters)."""
    config = getattr(model, "peft_config", {}).get("default")
    return None if config is None else config.lora_alpha / config.r


def full_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of `model` (unwrapped; FSDP2-sharded or not) as a whole tensor under the plain
    model's names, one layer at a time: a sharded parameter is all-gathered when its turn comes, so
    every rank must iterate to the end (each gather is a collective) and holds one layer's whole
    weights at a time, never the whole model. LoRA adapters come merged into their layer."""
    from torch.distributed.tensor import DTensor

    scaling = lora_scaling(model)
    pending: dict[str, torch.Tensor] = {}  # one adapted layer's base, A and B until all three arrive
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id"):  # a ZeRO-3 partition: gathered for the moment it is read
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                whole = param.detach().clone()
        else:
            whole = (param.full_tensor() if isinstance(param, DTensor) else param).detach()
        if scaling is None:
            yield name, whole
            continue
        name = name.removeprefix("base_model.model.")
        if ".base_layer." in name or _LORA.match(name):
            pending[name] = whole
            module = name.split(".base_layer.")[0] if ".base_layer." in name else _LORA.match(name)["module"]
            ab = [k for k in pending if k.startswith(module + ".lora_")]
            base = [k for k in pending if k.startswith(module + ".base_layer.")]
            if len(ab) == 2 and base:
                yield from merge_lora({k: pending.pop(k) for k in ab + base}, scaling).items()
        else:
            yield name, whole
    for name, value in pending.items():  # biases of adapted layers (no lora part of their own)
        yield name.replace(".base_layer.", "."), value
