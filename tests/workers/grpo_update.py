"""One GRPO update on a fixed batch, in one process or under `accelerate launch` (each rank takes
every world-th sample; `run_update` starts either): rank 0 writes what the update logged, what ran
and a checksum of the updated weights to OUT.json.

    python tests/workers/grpo_update.py MODEL_DIR OUT.json [PRECISION] [--updates N]

With --updates N it also times N - 1 more updates, each followed by the in-memory sync into the hf
engine's copy (benchmarks/sharded_step.py).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import torch


def fixed_batch(tokenizer, n: int = 6) -> list:
    """n samples of unequal length with agent-token masks and advantages; seeded, the same on every rank."""
    from leafe.methods.grpo import Sample

    rng = random.Random(7)
    words = ["up", "down", "left", "right", "box", "wall", "goal", "push", "Thought", "Action"]
    samples = []
    for i in range(n):
        ids = tokenizer.encode(" ".join(rng.choice(words) for _ in range(rng.randrange(12, 40))))
        mask = [0] * len(ids)
        for start in range(3, len(ids), 9):  # agent turns between observations
            for j in range(start, min(start + 4, len(ids))):
                mask[j] = 1
        samples.append(Sample(ids, mask, advantage=(-1.0) ** i * (0.5 + 0.25 * i)))
    return samples


def run_update(model: Path, out: Path, sharding: str | None = None, processes: int = 2, precision: str = "no",
               updates: int = 1, timeout: float = 600) -> dict:
    """This worker on the fixed batch, in one process (`sharding` None) or on `processes` ranks under
    `accelerate launch` with the config a study writes for `sharding` (ddp, fsdp) on this machine;
    returns what rank 0 wrote to `out`. Used by the sharding tests, benchmarks/sharded_step.py and
    benchmarks/gpu_check_sharded.py."""
    import json
    import subprocess

    args = [str(Path(__file__)), str(model), str(out), precision, "--updates", str(updates)]
    if sharding is None:
        command, env = [sys.executable, *args], dict(os.environ)
    else:
        import yaml

        from leafe.scale.stage import SHARDING_RAN, accelerate_command, accelerate_config, ranks_env
        from leafe.settings import TrainingSettings

        config = out.with_suffix(".yaml")
        training = TrainingSettings(processes=processes, sharding=sharding)
        config.write_text(yaml.safe_dump(accelerate_config(training, torch.cuda.is_available())))
        command, env = accelerate_command(config, *args), ranks_env(SHARDING_RAN[sharding])
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the update ({sharding or 'one process'}) failed (exit {done.returncode}): "
                           f"{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str]) -> None:
    import argparse
    import time

    from transformers import AutoModelForCausalLM

    from leafe.backends.hf import HFBackend
    from leafe.files import process_rank, write_json
    from leafe.methods.distributed import full_weights
    from leafe.methods.grpo import GRPOTrainer
    from leafe.settings import GRPOSettings

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("precision", nargs="?", default=None)
    parser.add_argument("--updates", type=int, default=1, help="timed updates, each followed by a sync")
    args = parser.parse_args(argv)
    rank, world = process_rank()
    torch.manual_seed(0)
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"  # the GPU check
    sampler = HFBackend(args.model, device=device, dtype="float32")
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    # small micro-batches: several per rank, and unequal counts over the ranks
    settings = GRPOSettings(learning_rate=1e-3, kl_coef=0.05, max_batch_tokens=64, is_cap=0.0)
    trainer = GRPOTrainer(policy, sampler, settings, ref, shared=False, precision=args.precision)
    samples = fixed_batch(sampler.tokenizer)
    record = trainer.update(samples[rank::world], seed=11)
    checksum = sum(float(w.double().sum()) for _, w in full_weights(trainer.accelerator.unwrap_model(trainer.policy)))
    timings = []
    for i in range(args.updates - 1):  # the first update above warms up; these are timed (benchmarks)
        trainer.barrier()
        started = time.perf_counter()
        trainer.update(samples[rank::world], seed=12 + i)
        updated = time.perf_counter()
        trainer.sync()
        timings.append({"update_s": updated - started, "sync_s": time.perf_counter() - updated,
                        "sync_bytes": trainer.sync_bytes})
    if rank == 0:
        write_json(Path(args.out), {**record, "checksum": checksum, "ran": trainer.ran(), "timings": timings})
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(0)  # see leafe.scale.stage.main: no gloo teardown at exit
