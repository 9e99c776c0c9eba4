"""Side by side: evaluation speed of an older leafe against this checkout, on the same machine, in one run.

    python benchmarks/engine_speed.py --before d5882ff [--before COMMIT ...] --model OLD_AGENT [--model NEW_AGENT] \
        [--variant end_when_lost=true] --out benchmarks/results/engine_speed.json

The `--before` commit is exported (`git archive`) into a temporary directory and each side runs
`leafe eval` as its own process with its own code on PYTHONPATH: the same tasks, seeds, samples and
batch. Runs alternate (before, after, before, after, ...), so a machine whose speed drifts (other
jobs, a 2x spread between machines of one kind) weighs on both sides alike; the medians are compared.

Every `--before` commit is a side of its own; the first is the one the speed-ups are relative to.
A `--variant K=V` is one more side: this checkout with that env parameter (e.g. `end_when_lost=true`,
which ends a Sokoban episode once it can only fail: other episodes, the same expected outcome).

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

from vllm_overhead import machine  # the processor's name: machines of one kind differ (AMD, Intel)

ROOT = Path(__file__).resolve().parents[1]


def export(commit: str, into: Path) -> Path:
    """The tree of `commit` (leafe's package only) under `into`."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "leafe"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def run_eval(code: Path, model: str, out: Path, args: argparse.Namespace, env_params: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "leafe", "eval", "--model", model, "--out", str(out), "--tasks", str(args.tasks),
           "--samples", str(args.samples), "--task-seed", str(args.task_seed), "--max-batch", str(args.max_batch),
           "--save-episodes"]
    for param in ("max_steps=15", *env_params):
        cmd += ["--env-param", param]
    env = {**os.environ, "PYTHONPATH": str(code)}
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=code, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"leafe eval failed on {code}: {(done.stderr.strip().splitlines() or ['(no output)'])[-1]}")
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
    parser.add_argument("--before", action="append", required=True,
                        help="commit of the code to compare against (repeatable; the first is the reference)")
    parser.add_argument("--variant", action="append", default=[], metavar="K=V",
                        help="one more side: this checkout with this env parameter (repeatable)")
    parser.add_argument("--model", action="append", required=True,
                        help="agent directory; the first is run by both sides, any other by this checkout only")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--task-seed", type=int, default=900000)
    parser.add_argument("--max-batch", type=int, default=160)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # Each side runs with its own code as the working directory, so a relative path would not resolve.
    args.model = [str(Path(m).resolve()) for m in args.model]

    with tempfile.TemporaryDirectory(prefix="leafe-bench-") as tmp:
        sides = []
        for commit in args.before:
            code = export(commit, Path(tmp) / f"code-{commit}")
            sides.append((f"before {commit}", code, args.model[0], ()))
        sides.append(("after", ROOT, args.model[0], ()))
        sides += [(f"after, {Path(m).name}", ROOT, m, ()) for m in args.model[1:]]
        sides += [(f"after, {v}", ROOT, args.model[0], (v,)) for v in args.variant]
        runs: dict[str, list[dict]] = {name: [] for name, *_ in sides}
        for rep in range(args.reps):
            for name, code, model, params in sides:
                run = run_eval(code, model, Path(tmp) / f"{len(runs[name])}-{name}", args, params)
                runs[name].append(run)
                print(f"rep {rep + 1} {name}: {run['tokens_per_s']} tok/s, {run['episodes_per_s']} episodes/s, "
                      f"wall {run['wall_s']} s", flush=True)
    result = {
        "machine": machine(),
        "before": args.before,
        "workload": {k: getattr(args, k) for k in ("tasks", "samples", "task_seed", "max_batch")},
        "sides": {name: summarize(r) for name, r in runs.items()},
    }
    b, a = result["sides"][f"before {args.before[0]}"], result["sides"]["after"]
    # Exact engine changes: every code side gave one and the same set of episodes on the first model.
    same = [result["sides"][f"before {c}"]["digests"] for c in args.before] + [a["digests"]]
    result["same_episodes"] = all(d == a["digests"] for d in same) and len(a["digests"]) == 1
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
