"""GRPO's step time with its rollouts from the policy itself (hf) against a vLLM engine synced after
every step, on the same model, settings and seeds.

    python benchmarks/grpo_engines.py --model MODEL_DIR --steps 3 --out benchmarks/results/grpo_engines.json

Runs `leafe train grpo` twice, one engine after the other (never both at once: they would share the
cores): hf from this Python, vllm from .venv-vllm (vLLM for CPU pins its own torch). Each step's
log record splits its wall time into rollout (sampling and the envs), update and, for vllm, the
weight sync (policy written to /dev/shm, reloaded by the engine). Defaults are the demo's GRPO
settings (configs/sokoban-demo.yaml): 6 tasks x 8 episodes a step, 15 env steps, 64 new tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
DEMO = ["--env", "sokoban", "--env-param", "max_steps=15", "--tasks", "64", "--task-seed", "5000",
        "--tasks-per-step", "6", "--group-size", "8", "--lr", "1e-4", "--kl-coef", "0.01", "--save-every", "0"]


def run(engine: str, model: str, steps: int, work: Path) -> list[dict]:
    python = sys.executable if engine == "hf" else str(VLLM_PYTHON)
    out = work / engine
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "2"}
    command = [python, "-m", "leafe", "train", "grpo", "--model", model, "--out", str(out), "--steps", str(steps),
               "--backend", engine, *DEMO]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{engine} run failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def summary(log: list[dict]) -> dict:
    def median(key):
        return round(statistics.median(r.get(key, 0.0) for r in log), 3)

    updates = [r["wall_s"] - r["rollout_s"] - r.get("sync_s", 0.0) for r in log]
    return {"steps": len(log), "wall_s": median("wall_s"), "rollout_s": median("rollout_s"),
            "update_s": round(statistics.median(updates), 3), "sync_s": median("sync_s"),
            "generated_tokens": sum(r["generated_tokens"] for r in log),
            "success": [round(r["success"], 3) for r in log],
            "sampler_gap": [r.get("sampler_gap") for r in log], "is_weight": [r.get("is_weight") for r in log]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the demo's base agent (leafe bootstrap's output)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "grpo_engines.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grpo-engines-"))
    try:
        results = {engine: summary(run(engine, args.model, args.steps, work)) for engine in ("hf", "vllm")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["machine"] = f"{platform.node()}, {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    for engine in ("hf", "vllm"):
        r = results[engine]
        print(f"{engine:5s} step {r['wall_s']:7.1f} s = rollout {r['rollout_s']:6.1f} + update {r['update_s']:6.1f} "
              f"+ sync {r['sync_s']:5.2f}  ({r['generated_tokens']} tokens in {r['steps']} steps)")


if __name__ == "__main__":
    main()
