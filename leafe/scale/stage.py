"""A study's training stage on several processes: `leafe run` writes the stage's job (method, model,
settings) to the stage directory and starts `accelerate launch -m leafe.scale.stage JOB` with an
accelerate config made from the study's `training:` section; every rank runs the method as
`leafe distill` / `leafe train grpo` would under `leafe launch`, and rank 0 writes the result the
study reads back. Which methods launch, and with which settings a rank calls one, is the method
registry's (`leafe.methods.registry`: the entries whose `launch` is "method"); `sft` trains rows a
method built itself (Early Experience, `sft_launcher`).

Why a subprocess: the ranks need a process group from their start, and the study's own process holds
the sampling engine's client and the run's state. The engine is shut down before the launch (one
model resident at a time); the study process waits and holds no model meanwhile.

The study holds the run directory's lock (`leafe.lock`); the ranks' environment (`ranks_env`) carries
its LEAFE_RUN_LOCK, so rank 0, which writes the stage's directory under it, is known for the study's
own child and goes on; a job started by hand takes the directory's lock like any writer. Other ranks,
and other machines' (`follow`), take no lock.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from leafe.errors import LeafeError
from leafe.files import process_rank, read_json, read_jsonl, write_json, write_jsonl, write_text
from leafe.lock import dying_with_parent, run_lock
from leafe.method import Job, MethodResult
from leafe.methods import registry
from leafe.methods.distributed import SHARDING_ENV, leave_launch
from leafe.settings import GenerationSettings, SFTSettings, TrainingSettings
from leafe.tracking import Tracker

JOB, RESULT, LOG, CONFIG = "launch_job.json", "launch_result.json", "launch.log", "accelerate.yaml"
#: training.sharding -> what a rank reports it ran (`leafe.methods.distributed.ran`).
SHARDING_RAN = {"ddp": "ddp", "fsdp": "fsdp2", "zero3": "zero3"}
#: A launch of rows already built (`sft_launcher`: the SFT of a method whose registry entry has launch "sft").
SFT = "sft"
ROWS = "launch_rows.jsonl"


def launched() -> list[str]:
    """What a study can launch over processes: the methods the registry launches whole, and `sft`."""
    return [m.name for m in registry.methods() if m.launch == "method"] + [SFT]


def accelerate_config(training: TrainingSettings, cuda: bool) -> dict[str, Any]:
    """The accelerate config of `training` on this machine (the keys configs/accelerate/*.yaml explain).

    The same config on GPUs and CPUs: without GPUs the ranks meet over gloo (accelerate's MULTI_GPU
    launcher starts them; its MULTI_CPU one starts a single process without MPI), and an FSDP config
    shards on CPU processes too (`leafe.methods.distributed`). ZeRO-3 is refused on CPUs (`launch`)."""
    if training.machines > 1:  # every machine must name the same place to meet
        address, port = training.main_address, training.main_port
    else:
        address = "127.0.0.1"
        with socket.socket() as s:  # a free port: two studies on one machine must not meet
            s.bind((address, 0))
            port = s.getsockname()[1]
    bf16 = training.mixed_precision == "bf16" or (training.mixed_precision == "auto" and cuda)
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU",
        "mixed_precision": "bf16" if bf16 else "no", "num_machines": training.machines,
        "num_processes": training.world, "machine_rank": training.machine_rank, "main_process_ip": address,
        "main_process_port": port, "rdzv_backend": "static", "same_network": True, "use_cpu": False,
        "downcast_bf16": "no", "debug": False}
    if training.sharding == "fsdp":
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2, "fsdp_reshard_after_forward": True, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False, "fsdp_activation_checkpointing": False}
    elif training.sharding == "zero3":
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {"zero_stage": 3, "zero3_init_flag": True, "zero3_save_16bit_model": True,
                                      "offload_optimizer_device": "none", "offload_param_device": "none"}
    return config


def launch(method: str, job: Job, training: TrainingSettings, **settings: Any) -> MethodResult:
    """Run `method` on `training.processes` processes and return rank 0's result. `settings`: the
    method's dataclasses by the names of its parameters (its registry entry's `settings`, and
    `generation` where it needs one; `sft` for rows already built)."""
    import torch
    import yaml

    if method not in launched():
        raise LeafeError(f"{method} runs in one process; training.processes > 1 is for {', '.join(launched())}")
    if training.machine_rank != 0:
        raise LeafeError("machine 0 launches the training stages; the others join them with `leafe run` (follow)")
    cuda = torch.cuda.is_available()
    if training.sharding == "zero3" and not cuda:
        raise LeafeError("training.sharding: zero3 is not wired for CPU processes (its engine fixes the micro-batches "
                         "per step that GRPO varies; docs/scaling.md); use sharding: fsdp")
    if training.sharding == "zero3" and importlib.util.find_spec("deepspeed") is None:
        raise LeafeError("training.sharding: zero3 needs deepspeed: pip install deepspeed (or use sharding: fsdp)")
    out = job.out
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT).unlink(missing_ok=True)
    config = accelerate_config(training, cuda)
    write_text(out / CONFIG, yaml.safe_dump(config))
    # `accelerate` and `launch_id` are for the other machines' `leafe run` (`follow`): the same config
    # with their own machine_rank, each launch once.
    spec = {"method": method, "model": job.model, "out": str(out), "inputs": [str(p) for p in job.inputs],
            "device": job.device, "precision": config["mixed_precision"], "accelerate": config,
            "sharding": SHARDING_RAN[training.sharding], "launch_id": uuid.uuid4().hex,
            "settings": {k: asdict(v) for k, v in settings.items() if v is not None},
            "tracking": job.tracker.spec()}  # rank 0 reports to the study's tracker run (`leafe.tracking`)
    write_json(out / JOB, spec)
    job.progress.start(None)
    done = _accelerate_launch(out / CONFIG, out / JOB, out / LOG, spec["sharding"])
    if done.returncode != 0 or not (out / RESULT).exists():
        tail = (out / LOG).read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise LeafeError(f"{method} on {training.world} processes failed (exit {done.returncode}); "
                         f"see {out / LOG}: {tail[0][:200]}")
    result = read_json(out / RESULT)
    if "no_rows" in result:
        from leafe.methods.distill import NoDistillationRows

        raise NoDistillationRows(result["trees"], result["no_rows"])
    return MethodResult(**result)


def accelerate_command(config: Path, *target: str) -> list[str]:
    """`accelerate launch --config_file CONFIG TARGET...`, with the accelerate of this Python's environment."""
    beside = Path(sys.executable).parent / "accelerate"
    return [str(beside) if beside.exists() else "accelerate", "launch", "--config_file", str(config), *target]


def ranks_env(sharding: str) -> dict[str, str]:
    """The environment of a launch's ranks: unbuffered output, and the sharding each must report it
    got (`distributed.check_ran`): a launch never trains unsharded in silence. It is this process's
    environment, so a run lock this process holds reaches the ranks (LEAFE_RUN_LOCK)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", SHARDING_ENV: sharding}


def _accelerate_launch(config: Path, job: Path, log_path: Path, sharding: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file CONFIG -m leafe.scale.stage JOB`, its output appended to LOG."""
    command = accelerate_command(config, "-m", "leafe.scale.stage", str(job))
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=ranks_env(sharding), check=False,
                              preexec_fn=dying_with_parent())  # its ranks go with it (torchrun ends them)


def follow(run_dir: Path, training: TrainingSettings, poll_s: float = 0.5) -> int:
    """Machine `training.machine_rank` (> 0) of a study that trains across machines: join each
    training stage machine 0 launches, until its study ends; returns the number joined.

    Machine 0 writes each launch's job (with its accelerate config and a launch id) into the stage's
    directory under the run directory, which every machine must see at the same path (a shared
    filesystem); this machine starts its own `accelerate launch` of the same job with its machine
    rank, and the ranks meet at training.main_address. The study ends when machine 0 writes
    results.json (newer than this machine's start)."""
    import yaml

    run_dir = Path(run_dir)
    started, served = time.time(), set()
    while True:
        for job_path in sorted(run_dir.rglob(JOB)):
            try:
                spec = read_json(job_path)
            except (OSError, ValueError):  # being written
                continue
            if spec.get("launch_id") in served or "accelerate" not in spec:
                continue
            served.add(spec["launch_id"])
            if job_path.stat().st_mtime < started:  # a launch of an earlier run: long over
                continue
            out = job_path.parent
            config = out / f"accelerate.machine{training.machine_rank}.yaml"
            write_text(config, yaml.safe_dump({**spec["accelerate"], "machine_rank": training.machine_rank}))
            print(f"machine {training.machine_rank}: joining {spec['method']} in {out}", flush=True)
            done = _accelerate_launch(config, job_path, out / f"launch.machine{training.machine_rank}.log",
                                      spec["sharding"])
            if done.returncode != 0:
                raise LeafeError(f"{spec['method']} failed on machine {training.machine_rank} (exit "
                                 f"{done.returncode}); see {out / f'launch.machine{training.machine_rank}.log'}")
        results = run_dir / "results.json"
        if results.exists() and results.stat().st_mtime >= started:
            return len(served)
        time.sleep(poll_s)


class _LogLines:
    """Rank 0's progress in launch.log: a line when the total is known and at most one a minute after."""

    def __init__(self, name: str, every_s: float = 60.0):
        self.name, self.every_s, self.done, self.total, self.last = name, every_s, 0, None, 0.0

    def start(self, total: int | None, done: int = 0) -> None:
        self.total, self.done, self.last = total, done, time.monotonic()
        print(f"{self.name}: {done}/{total}", flush=True)

    def advance(self, n: int = 1, status: str = "") -> None:
        self.done += n
        if time.monotonic() - self.last >= self.every_s or self.done == self.total:
            self.last = time.monotonic()
            print(f"{self.name}: {self.done}/{self.total} {status}".rstrip(), flush=True)


def sft_launcher(training: TrainingSettings, device: str = "auto"):
    """`Job.train_sft` for a method that builds rows and trains on them (Early Experience): each call
    writes the rows beside its output and trains them on `training.processes` processes."""

    def train_sft(model: str, rows: list, out: Path, sft: SFTSettings) -> dict[str, Any]:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / ROWS, [asdict(r) for r in rows])
        result = launch("sft", Job(model=str(model), out=out, inputs=[out / ROWS], device=device), training,
                        sft=sft)
        return result.data

    return train_sft


def _run(spec: dict[str, Any], tracker: Tracker) -> dict[str, Any]:
    """One rank's share of the job (every rank calls the method; the methods make rank 0 the writer)."""
    from leafe.method import NoProgress

    settings = spec["settings"]
    job = Job(model=spec["model"], out=Path(spec["out"]), inputs=[Path(p) for p in spec["inputs"]],
              device=spec["device"], precision=spec.get("precision"), progress=_LogLines(spec["method"]) if process_rank()[0] == 0 else NoProgress(),
              tracker=tracker)
    if spec["method"] == SFT:  # rows already built (Early Experience): train them
        from transformers import AutoTokenizer

        from leafe.methods.sft import Row, train

        rows = [Row(**r) for r in read_jsonl(job.inputs[0])]
        summary = train(job.model, AutoTokenizer.from_pretrained(job.model), rows, job.out,
                        SFTSettings(**settings["sft"]), precision=job.precision)
        summary.pop("model")
        return MethodResult("sft", str(job.out), settings["sft"], summary, {}).to_dict()
    from leafe.methods.distill import NoDistillationRows

    method = registry.get(spec["method"])
    own = [cls(**settings[name]) for name, cls in method.settings.items()]
    generation = {"generation": GenerationSettings(**settings["generation"])} if "generation" in settings else {}
    try:
        return method.load()(job, *own, **generation).to_dict()
    except NoDistillationRows as empty:  # LEAFE's distillation: stage 1 left nothing to distil
        return {"no_rows": empty.counts, "trees": empty.trees}


def main(argv: list[str]) -> None:
    spec = read_json(Path(argv[0]))
    with run_lock(spec["out"], f"leafe.scale.stage {spec['method']}"):  # rank 0 only; the study's own: nothing
        with Tracker.from_spec(spec.get("tracking")) as tracker:  # reports from rank 0 only
            result = _run(spec, tracker)
        if process_rank()[0] == 0:
            write_json(Path(spec["out"]) / RESULT, result)
    leave_launch(0)  # a rank that hung or aborted in teardown would fail the study after its result


if __name__ == "__main__":
    main(sys.argv[1:])
