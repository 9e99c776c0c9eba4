"""Scale-out figures on the embedded base agent: vLLM vs hf sampling, prefix caching on branch
prompts, and exploration in process vs on Ray workers.

    .venv-vllm/bin/python benchmarks/scale.py sampling [--out FILE]   # needs vLLM (make vllm-env)
    .venv/bin/python benchmarks/scale.py explore [--out FILE]         # needs Ray (leafe[ray])

`sampling`:
- throughput: the first prompts of 32 Sokoban tasks, 4 samples each, up to 64 new tokens (the agent's
  turn limit), T=1, stopping at the end of turn: generated tokens per second of each backend, after
  one warm-up call; then a whole evaluation (16 tasks x 4 episodes, every turn batched) per backend.
- branches: as LEAFE stage 1 samples them: the base agent plays a Sokoban episode for 8 turns; its
  history h_tau at tau = 4 and 8 is sent once (the parent's own turn, which fills the cache), then 4
  branches are sampled from h_tau + an experience message each. Prompt tokens, tokens actually
  prefilled, and the wall time of the branch calls, with each backend's prefix cache on and off.
`explore`: LEAFE exploration (rollback by replay) in process and with 2 env workers on a local Ray,
on Sokoban (12 tasks, budget 30; steps take microseconds) and on the code env (8 tasks, budget 12;
each step runs the sandboxed judge): wall time (Ray's start-up apart), env steps, identical trees.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from leafe.backends import SamplingParams, load_backend
from leafe.base_agent.bootstrap import ensure_base_agent
from leafe.envs import make
from leafe.method import Job
from leafe.methods.evaluate import evaluate
from leafe.prompts import experience_message
from leafe.rollout import RolloutEngine
from leafe.settings import EvalSettings


def machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"


def first_prompts(backend, tasks: int) -> list[list[int]]:
    engine = RolloutEngine(backend)
    return [engine.start(make("sokoban"), t).conv.prompt_ids() for t in make("sokoban").make_tasks(tasks, 900000)]


def throughput(backend, prompts, reps: int = 2) -> dict:
    from leafe.chat import ChatFormat

    sampling = SamplingParams(n=4, temperature=1.0, max_new_tokens=64,
                              stop_token_ids=ChatFormat(backend.tokenizer).stop_token_ids)
    backend.generate(prompts[:4], sampling)  # warm-up (compilation, allocator)
    runs = []
    for rep in range(reps):
        before, started = backend.stats.generated_tokens, time.perf_counter()
        backend.generate(prompts, replace(sampling, seed=rep + 1))
        wall = time.perf_counter() - started
        runs.append({"generated_tokens": backend.stats.generated_tokens - before, "wall_s": round(wall, 3),
                     "tokens_per_s": round((backend.stats.generated_tokens - before) / wall, 1)})
    return {"prompts": len(prompts), "n": 4, "runs": runs}


def eval_run(backend, out: Path) -> dict:
    settings = EvalSettings(tasks=16, samples=4, task_seed=900000, max_batch=64)
    started = time.perf_counter()
    result = evaluate(Job("base-agent", out, backend=backend), settings).data
    wall = time.perf_counter() - started
    return {"episodes": 64, "env_steps": result["env_steps"], "generated_tokens": result["generated_tokens"],
            "pass@1": result["pass_at_k"]["1"], "wall_s": round(wall, 2),
            "tokens_per_s": round(result["generated_tokens"] / wall, 1)}


def branch_prompts(backend) -> list[tuple[list[int], list[list[int]]]]:
    """(h_tau, its 4 branch prompts) at tau = 4 and 8 of a few base-agent episodes."""
    engine = RolloutEngine(backend, seed=11)
    out = []
    for task in make("sokoban").make_tasks(3, 900100):
        live = engine.start(make("sokoban"), task)
        cuts = {}
        for t in range(8):
            if live.done:
                break
            engine.step([live])
            cuts[t + 1] = live.conv.copy()
        for tau in (4, 8):
            if tau not in cuts:
                continue
            history = cuts[tau].prompt_ids()
            branches = []
            for e in ("push the box before walking past it.", "the wall blocks the left side; go up first.",
                      "stop repeating the same move.", "check where the goal is before moving."):
                conv = cuts[tau].copy()
                conv.add_message("user", experience_message(e))
                branches.append(conv.prompt_ids())
            out.append((history, branches))
    return out


def branch_run(backend, trees) -> dict:
    from leafe.chat import ChatFormat

    sampling = SamplingParams(n=1, temperature=1.0, max_new_tokens=64,
                              stop_token_ids=ChatFormat(backend.tokenizer).stop_token_ids)
    prompt = prefill = 0
    wall = 0.0
    for i, (history, branches) in enumerate(trees):
        backend.generate([history], replace(sampling, seed=100 + i))  # the parent's turn
        before_prompt, before_prefill = backend.stats.prompt_tokens, backend.stats.prefill_tokens
        started = time.perf_counter()
        backend.generate(branches, replace(sampling, seed=i))
        wall += time.perf_counter() - started
        prompt += backend.stats.prompt_tokens - before_prompt
        prefill += backend.stats.prefill_tokens - before_prefill
    return {"branch_calls": len(trees), "prompt_tokens": prompt, "prefill_tokens": prefill,
            "prefill_share": round(prefill / prompt, 3), "wall_s": round(wall, 3)}


def sampling_main(out_file: Path) -> None:
    model = str(ensure_base_agent())
    results: dict = {"machine": machine(), "model": "embedded base agent (leafe bootstrap)"}
    hf = load_backend("hf", model, device="cpu", dtype="float32")
    prompts = first_prompts(hf, 32)
    trees = branch_prompts(hf)
    results["hf"] = {"throughput": throughput(hf, prompts)}
    with tempfile.TemporaryDirectory() as tmp:
        results["hf"]["eval"] = eval_run(hf, Path(tmp) / "e")
    results["hf"]["branches_cache_on"] = branch_run(hf, trees)
    hf.cache.clear()
    results["hf"]["branches_cache_off"] = branch_run(load_backend("hf", model, device="cpu", dtype="float32",
                                                                  prefix_cache_mb=0), trees)
    del hf
    for caching in (True, False):
        started = time.perf_counter()
        vllm = load_backend("vllm", model, max_model_len=2048, enable_prefix_caching=caching)
        load_s = round(time.perf_counter() - started, 1)
        key = "branches_cache_on" if caching else "branches_cache_off"
        entry = results.setdefault("vllm", {"load_s": load_s})
        if caching:
            entry["throughput"] = throughput(vllm, prompts)
            with tempfile.TemporaryDirectory() as tmp:
                entry["eval"] = eval_run(vllm, Path(tmp) / "e")
        entry[key] = branch_run(vllm, trees)
        vllm.close()
    out_file.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def explore_main(out_file: Path) -> None:
    from leafe.methods.explore import explore
    from leafe.scale.workers import env_workers
    from leafe.settings import ExploreSettings
    from leafe.trees import read_trees

    model = str(ensure_base_agent())
    backend = load_backend("hf", model, device="cpu", dtype="float32")
    results: dict = {"machine": machine(), "strategy": "leafe", "snapshots": False}
    # Sokoban steps take microseconds; a code step runs the judge (a sandboxed python per test).
    for env, tasks, budget in (("sokoban", 12, 30), ("code", 8, 12)):
        settings = ExploreSettings(env=env, tasks=tasks, task_seed=0 if env == "code" else 5000, budget=budget,
                                   parallel_tasks=tasks, snapshots=False)
        entry = results[env] = {"tasks": tasks, "budget": budget}
        trees = {}
        with tempfile.TemporaryDirectory() as tmp:
            for workers in (0, 2):
                backend.cache.clear()
                started = time.perf_counter()
                with env_workers(workers) as envs:
                    ready = time.perf_counter()
                    summary = explore(Job("base-agent", Path(tmp) / str(workers), backend=backend, envs=envs), settings).data
                    wall = time.perf_counter() - ready
                trees[workers] = [[n.episode.token_ids for n in r["nodes"]]
                                  for r in read_trees(Path(tmp) / str(workers) / "trees.jsonl")]
                entry["in_process" if workers == 0 else f"ray_{workers}_workers"] = {
                    "wall_s": round(wall, 2), "ray_start_s": round(ready - started, 2),
                    "env_steps": summary["env_steps"], "replayed_steps": summary["replayed_steps"],
                    "branches": summary["branches"], "success_rate": summary["success_rate"]}
        entry["identical_trees"] = trees[0] == trees[2]
        print(env, json.dumps(entry), flush=True)
    results["judge_steps"] = judge_steps()
    out_file.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def judge_steps(envs_per_turn: int = 8, turns: int = 3) -> dict:
    """One turn of `envs_per_turn` code episodes whose replies are whole (wrong) programs, so every
    step runs the judge: the time to submit and collect a turn's steps, in process and on 2 workers."""
    from leafe.scale.workers import env_workers

    reply = "Thought: read the input and print it.\n```python\nimport sys\nprint(sys.stdin.read())\n```"
    tasks = make("code").make_tasks(envs_per_turn, 0)
    out = {"envs_per_turn": envs_per_turn, "turns": turns}
    for workers in (0, 2):
        with env_workers(workers) as maker:
            envs = [maker("code") for _ in tasks]
            for env, task in zip(envs, tasks):
                env.reset(task)
            started = time.perf_counter()
            for _ in range(turns):
                pending = [env.submit(reply) for env in envs]
                results = [wait() for wait in pending]
            wall = time.perf_counter() - started
        out["in_process" if workers == 0 else f"ray_{workers}_workers"] = {
            "steps_per_s": round(envs_per_turn * turns / wall, 2), "wall_s": round(wall, 2),
            "first_observation": results[0][1].observation.splitlines()[0]}
    return out


if __name__ == "__main__":  # vLLM and Ray start processes that re-import this module
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("sampling", "explore"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    default = Path(__file__).parent / "results" / f"scale_{args.what}.json"
    (sampling_main if args.what == "sampling" else explore_main)(args.out or default)
    sys.exit(0)
