"""Issue 37's part of benchmarks/gpu_check.sh: the sharded training path on every visible GPU.

    python benchmarks/gpu_check_sharded.py WORK

1. One GRPO update on a fixed batch (tests/workers/grpo_update.py) in one process and under FSDP2 over
   every visible GPU (NCCL): the loss, gradient norm and updated weights must agree, as on CPU.
2. GRPO, 2 steps, FSDP2 over every GPU, LoRA, bf16, each rank sampling from a whole hf copy synced in
   memory: what ran, the steps' sync time, a plain bf16 model saved.
3. The same with a vLLM engine per rank, synced in memory (`VLLMBackend.update_weights`), when vllm
   is importable.
Prints one JSON line per part (`OUT/gpu_check_sharded.json` gets them all); exits non-zero on a mismatch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def update(model: Path, out: Path, gpus: int | None) -> dict:
    from workers.grpo_update import run_update

    return run_update(model, out, None if gpus is None else "fsdp", processes=gpus or 1, timeout=240)


def main(work: Path) -> None:
    from probes.real_models import build_acting
    from safetensors import safe_open

    from leafe.method import Job
    from leafe.scale.stage import launch
    from leafe.settings import GenerationSettings, GRPOSettings, TrainingSettings

    # GPUS=2 runs the script on CPU processes (gloo) to check it before a GPU is at hand
    gpus = int(os.environ.get("GPUS", torch.cuda.device_count()))
    out_dir = Path(os.environ.get("OUT", work))
    model = build_acting("qwen2.5", work / "acting-qwen2")
    report = []
    alone, sharded = update(model, work / "one.json", None), update(model, work / "fsdp.json", gpus)
    agree = {k: (alone[k], sharded[k]) for k in ("loss", "grad_norm", "checksum")}
    report.append({"part": "one update, 1 process vs FSDP2", "gpus": gpus, "ran": sharded["ran"], **agree})
    print(json.dumps(report[-1]), flush=True)
    assert sharded["ran"]["sharding"] == "fsdp2", sharded["ran"]
    for key, (a, b) in agree.items():  # bf16 is off here: fp32 on both sides, NCCL's reduction order only
        assert abs(a - b) <= 1e-4 * max(abs(a), 1.0), (key, a, b)

    settings = GRPOSettings(tasks=2 * gpus, task_seed=3, steps=2, tasks_per_step=gpus, group_size=4,
                            learning_rate=1e-2, max_new_tokens=16, env_params={"max_steps": 4}, invalid_penalty=0.1,
                            save_every=1, lora=True, lora_r=8)
    training = TrainingSettings(processes=gpus, sharding="fsdp", mixed_precision="bf16")
    engines = [("hf", None)]
    if importlib.util.find_spec("vllm") is not None:
        engines.append(("vllm", GenerationSettings(backend="vllm", dtype="bfloat16", max_model_len=4096,
                                                   gpu_memory_utilization=0.25)))
    for name, generation in engines:
        out = work / f"grpo-{name}"
        result = launch("grpo", Job(str(model), out, device="auto"), training, settings=settings,
                        generation=generation)
        steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            dtypes = sorted({str(f.get_tensor(k).dtype) for k in f.keys()})
        report.append({"part": f"GRPO, FSDP2 + LoRA + bf16, {name} engine", "ran": result.cost["ran"],
                       "steps": [{k: s.get(k) for k in ("step", "grad_norm", "sampler_gap", "sync_s", "wall_s")}
                                 for s in steps], "saved_dtypes": dtypes})
        print(json.dumps(report[-1]), flush=True)
        assert result.cost["ran"]["sharding"] == "fsdp2" and result.cost["ran"]["mixed_precision"] == "bf16"
        assert dtypes == ["torch.bfloat16"], dtypes
    (out_dir / "gpu_check_sharded.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
