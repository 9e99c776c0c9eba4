"""One GRPO update on a fixed batch, run by tests/test_sharded_training.py in one process or under
`accelerate launch` (each rank takes every world-th sample): prints what the update logged, what ran,
and a checksum of the updated weights, as one JSON line from rank 0.

    python tests/workers/grpo_update.py MODEL_DIR OUT.json [PRECISION]
"""

from __future__ import annotations

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


def main(model: str, out: str, precision: str | None = None) -> None:
    from transformers import AutoModelForCausalLM

    from leafe.backends.hf import HFBackend
    from leafe.files import process_rank, write_json
    from leafe.methods.distributed import full_weights
    from leafe.methods.grpo import GRPOTrainer
    from leafe.settings import GRPOSettings

    rank, world = process_rank()
    torch.manual_seed(0)
    sampler = HFBackend(model, device="cpu", dtype="float32")
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    # small micro-batches: several per rank, and unequal counts over the ranks
    settings = GRPOSettings(learning_rate=1e-3, kl_coef=0.05, max_batch_tokens=64, is_cap=0.0)
    trainer = GRPOTrainer(policy, sampler, settings, ref, shared=False, precision=precision)
    samples = fixed_batch(sampler.tokenizer)
    record = trainer.update(samples[rank::world], seed=11)
    checksum = sum(float(w.double().sum()) for _, w in full_weights(trainer.accelerator.unwrap_model(trainer.policy)))
    if rank == 0:
        write_json(Path(out), {**record, "checksum": checksum, "ran": trainer.ran()})
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
    sys.stdout.flush()
    import os

    os._exit(0)  # see leafe.scale.stage.main: no gloo teardown at exit
