"""What ACE's playbook costs an evaluation: the same held-out levels played with no playbook, with the
playbook's bullets as ace-agent/ace writes them (`[id] helpful=h harmful=x :: text`) and as
ace-appworld does (`[id] text`, `ace.bullet_counters: false`), one model and backend for all three.

    python benchmarks/ace_prompt_cost.py --model RUN/grpo/train --playbook RUN/ace/train/playbook.json \
        [--tasks 15 --samples 16] [--out FILE]

The playbook's lessons are rendered both ways whatever it was trained with. Each row: the system
prompt's tokens, wall time, Pass@1, generated and prefilled tokens. The default levels are the first
half of the demo's held-out ones (seed 900000), at the demo's batch of 240 episodes.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from leafe import EvalSettings, Job, evaluate, load_backend
from leafe.methods.ace import Playbook
from leafe.prompts import SYSTEM_PROMPT, playbook_system_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--playbook", required=True, help="a playbook.json written by leafe train ace")
    parser.add_argument("--tasks", type=int, default=15)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--task-seed", type=int, default=900000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    book = Playbook.from_dict(json.loads(Path(args.playbook).read_text()))
    renderings = {"none": [], "counters": book.lines(counters=True), "ids": book.lines(counters=False)}
    backend = load_backend("hf", args.model)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, lines in renderings.items():
            settings = EvalSettings(env="sokoban", env_params={"max_steps": 15, "end_when_lost": True},
                                    tasks=args.tasks, task_seed=args.task_seed, samples=args.samples,
                                    temperature=1.0, max_batch=240, playbook=lines)
            started = time.perf_counter()
            result = evaluate(Job(model=args.model, out=Path(scratch) / name, backend=backend), settings)
            row = {"playbook": name, "bullets": len(lines),
                   "system_prompt_tokens": len(backend.tokenizer(playbook_system_prompt(lines, SYSTEM_PROMPT))["input_ids"]),
                   "wall_s": round(time.perf_counter() - started, 1), "pass_at_1": result.data["pass_at_k"]["1"],
                   "generated_tokens": result.data["generated_tokens"], "prefill_tokens": result.data["prefill_tokens"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "args": vars(args) | {
            "out": str(args.out)}, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
