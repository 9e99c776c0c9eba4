"""Acceptance of the embedded base agent (issue: "the embedded base agent").

1. Pass@1 and Pass@32 on held-out levels (leafe's own evaluation, 32 samples, T=1.0).
2. Reflection: on the model's own failed episodes, the share of reflection replies that parse into
   (step, experience), and how often the step is the first irreversible mistake (found exactly with
   the distance table), against a uniformly random step in [0, T).
3. Experience use: from the state before the first irreversible mistake of a failed episode,
   success with the oracle experience in context vs without it (same samples per branch point).

    python benchmarks/base_agent.py --model DIR [--tasks 100 --samples 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from leafe.backends.hf import HFBackend
from leafe.envs import make
from leafe.envs.sokoban.oracle import Expert, first_mistake, oracle_experience
from leafe.files import read_jsonl
from leafe.method import Job
from leafe.methods.evaluate import evaluate
from leafe.prompts import parse_reflection
from leafe.rollout import RolloutEngine
from leafe.settings import EvalSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--task-seed", type=int, default=900_000)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--reflections", type=int, default=300, help="failed episodes to reflect on")
    parser.add_argument("--branch-points", type=int, default=150, help="failed episodes to branch from")
    parser.add_argument("--branch-samples", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-base-agent"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/base_agent.json"))
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    backend = HFBackend(args.model, device="cpu")
    report: dict = {"model": args.model}

    # 1. Pass@k.
    settings = EvalSettings(tasks=args.tasks, task_seed=args.task_seed, samples=args.samples, temperature=1.0)
    started = time.perf_counter()
    result = evaluate(Job(args.model, args.work / "eval", backend=backend), settings, save_episodes=True).data
    report["eval"] = {k: result[k] for k in ("pass_at_k", "ci95", "env_steps", "generated_tokens", "wall_s")}
    p1, p32 = result["pass_at_k"]["1"], result["pass_at_k"][str(args.samples)]
    print(f"Pass@1 {100 * p1:.1f}%  Pass@{args.samples} {100 * p32:.1f}%  ({time.perf_counter() - started:.0f}s)", flush=True)

    from leafe.episode import Episode

    episodes = [Episode.from_dict(e) for e in read_jsonl(args.work / "eval" / "episodes.jsonl")]
    tasks = {t.task_id: t for t in make("sokoban").make_tasks(args.tasks, args.task_seed)}
    failed = [e for e in episodes if not e.success and e.finish == "done"]
    rng = random.Random(0)
    rng.shuffle(failed)
    engine = RolloutEngine(backend, temperature=1.0, seed=1, max_new_tokens=64)
    recorder = engine.recorder

    # 2. Reflection on the model's own failures.
    chosen = failed[: args.reflections]
    lives = [_relive(recorder, tasks[e.task_id], e) for e in chosen]
    prompts = [recorder.reflection_prompt(live).prompt_ids() for live in lives]
    replies = [row[0].text for row in engine.generate(prompts)]
    parsed = named = right = 0
    chance = 0.0
    for episode, reply in zip(chosen, replies):
        expert = Expert.of(tasks[episode.task_id], 15)
        truth = first_mistake(expert, episode.actions)
        chance += 1.0 / len(episode.steps)
        reflection = parse_reflection(reply)
        if reflection is not None:
            parsed += 1
            named += reflection.step is not None
            right += reflection.step == truth
    n = len(chosen)
    report["reflection"] = {
        "episodes": n, "parsed": parsed / n, "named_a_step": named / n, "step_is_first_mistake": right / n, "uniform_random_step": chance / n,
        "examples": [{"reply": r} for r in replies[:5]],
    }
    print(f"reflections: {n}, parsed {100 * parsed / n:.1f}% (a step named in {100 * named / n:.1f}%), right step {100 * right / n:.1f}% "
          f"(uniform random step {100 * chance / n:.1f}%)", flush=True)

    # 3. Experience use from the first irreversible mistake.
    points = failed[: args.branch_points]
    with_exp, without = [], []
    for episode in points:
        expert = Expert.of(tasks[episode.task_id], 15)
        tau = first_mistake(expert, episode.actions)
        live = _relive(recorder, tasks[episode.task_id], episode)
        text = oracle_experience(expert, episode.actions, tau)
        for j in range(args.branch_samples):
            with_exp.append(recorder.branch(live, tau, text, make("sokoban"), {"j": j}))
            without.append(recorder.branch(live, tau, None, make("sokoban"), {"j": j}))
    ok_with = sum(e.success for e in engine.run(with_exp))
    ok_without = sum(e.success for e in engine.run(without))
    m = len(with_exp)
    report["experience"] = {"branch_points": len(points), "samples_each": args.branch_samples,
                            "success_with_oracle_experience": ok_with / m, "success_without": ok_without / m}
    print(f"from the first mistake: success with oracle experience {100 * ok_with / m:.1f}% vs without "
          f"{100 * ok_without / m:.1f}% ({m} branches each)", flush=True)
    summary = json.loads((Path(args.model) / "bootstrap.json").read_text()) if (Path(args.model) / "bootstrap.json").exists() else {}
    report["bootstrap"] = {k: summary.get(k) for k in ("parameters", "wall_s", "config_hash")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.out}")


def _relive(recorder, task, episode):
    """Re-play a recorded episode's replies through the recorder (same ids), to branch or reflect."""
    from leafe.backends.base import Completion

    live = recorder.start(make("sokoban"), task)
    for step in episode.steps:
        ids = episode.token_ids[step.action_start : step.action_end]
        recorder.apply(live, Completion(ids, step.reply, step.finish_reason))
    return live


if __name__ == "__main__":
    sys.exit(main())
