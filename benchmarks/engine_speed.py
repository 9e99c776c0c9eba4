"""Side by side: evaluation speed of an older leafe against this checkout, on the same machine, in one run.

    python benchmarks/engine_speed.py --before d5882ff --model OLD_AGENT [--model NEW_AGENT] \
        --out benchmarks/results/engine_speed.json

The `--before` commit is exported (`git archive`) into a temporary directory and each side runs
`leafe eval` as its own process with its own code on PYTHONPATH: the same tasks, seeds, samples and
batch. Runs alternate (before, after, before, after, ...), so a machine whose speed drifts (other
jobs, a 2x spread between machines of one kind) weighs on both sides alike; the medians are compared.

For a model both sides run, the episodes' token ids are compared: an engine change that is exact
gives the same episodes for the same seeds. A model run by this checkout only (an agent with another
tokenizer) is timed, not compared: its tokens are other tokens, so read its episodes/s and env steps/s
beside tokens/s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export(commit: str, into: Path) -> Path:
    """The tree of `commit` (leafe's package only) under `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "leafe"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def run_eval(code: Path, model: str, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "leafe", "eval", "--model", model, "--out", str(out), "--tasks", str(args.tasks),
           "--samples", str(args.samples), "--task-seed", str(args.task_seed), "--max-batch", str(args.max_batch),
           "--env-param", "max_steps=15", "--save-episodes"]
    env = {**os.environ, "PYTHONPATH": str(code)}
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=code, capture_output=True)
    process_s = time.perf_counter() - started
    result = json.loads((out / "eval.json").read_text())
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    digest = hashlib.sha256(json.dumps(sorted((e["task_id"], e["token_ids"]) for e in episodes)).encode()).hexdigest()
    wall = result["wall_s"]
    return {
        "wall_s": wall,
        "process_s": round(process_s, 1),
        "generated_tokens": result["generated_tokens"],
        "prefill_tokens": result["prefill_tokens"],
        "env_steps": result["env_steps"],
        "episodes": len(episodes),
        "tokens_per_s": round(result["generated_tokens"] / wall, 1),
        "env_steps_per_s": round(result["env_steps"] / wall, 2),
        "episodes_per_s": round(len(episodes) / wall, 3),
        "pass_at_1": result["pass_at_k"]["1"],
        "mean_context_tokens": round(statistics.mean(len(e["token_ids"]) for e in episodes), 1),
        "episodes_digest": digest[:16],
    }


def summarize(runs: list[dict]) -> dict:
    keys = ("wall_s", "tokens_per_s", "env_steps_per_s", "episodes_per_s")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out.update({k: runs[0][k] for k in ("generated_tokens", "env_steps", "episodes", "pass_at_1", "mean_context_tokens")})
    out["digests"] = sorted({r["episodes_digest"] for r in runs})
    out["runs"] = runs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="commit of the code to compare against")
    parser.add_argument("--model", action="append", required=True,
                        help="agent directory; the first is run by both sides, any other by this checkout only")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--task-seed", type=int, default=900000)
    parser.add_argument("--max-batch", type=int, default=160)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="leafe-bench-") as tmp:
        before = export(args.before, Path(tmp))
        sides = [("before", before, args.model[0]), ("after", ROOT, args.model[0])]
        sides += [(f"after, {Path(m).name}", ROOT, m) for m in args.model[1:]]
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in sides}
        for rep in range(args.reps):
            for name, code, model in sides:
                run = run_eval(code, model, Path(tmp) / f"{len(runs[name])}-{name}", args)
                runs[name].append(run)
                print(f"rep {rep + 1} {name}: {run['tokens_per_s']} tok/s, {run['episodes_per_s']} episodes/s, "
                      f"wall {run['wall_s']} s", flush=True)
    result = {
        "machine": os.uname().nodename and f"{os.cpu_count()}-core {os.uname().machine}",
        "before": args.before,
        "workload": {k: getattr(args, k) for k in ("tasks", "samples", "task_seed", "max_batch")},
        "sides": {name: summarize(r) for name, r in runs.items()},
    }
    b, a = result["sides"]["before"], result["sides"]["after"]
    result["same_episodes"] = b["digests"] == a["digests"] and len(a["digests"]) == 1
    for name, side in result["sides"].items():
        side["speedup_tokens_per_s"] = round(side["tokens_per_s"] / b["tokens_per_s"], 2)
        side["speedup_episodes_per_s"] = round(side["episodes_per_s"] / b["episodes_per_s"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, side in result["sides"].items():
        print(f"{name:>28}: {side['tokens_per_s']:8.1f} tok/s ({side['speedup_tokens_per_s']}x), "
              f"{side['episodes_per_s']:.3f} episodes/s ({side['speedup_episodes_per_s']}x), Pass@1 {side['pass_at_1']}")
    print(f"same episodes before/after on {Path(args.model[0]).name}: {result['same_episodes']}")


if __name__ == "__main__":
    main()
