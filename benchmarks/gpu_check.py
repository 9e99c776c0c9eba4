"""The GPU half of issue 25's checks, for a machine with CUDA and vLLM (run by benchmarks/gpu_check.sh).

On the tiny random-weight Qwen2.5, Qwen3 and Llama-3.1 models (real tokenizers, templates and
generation configs; tests/probes/real_models.py builds them), in bf16:
- hf and vllm greedy episodes' first turns, token for token, and where each stops;
- GPU memory before an engine starts, while it runs and after it is closed (vLLM's engine runs in its
  own process, so the device's used memory is read through nvidia-smi, with this process's
  torch.cuda.memory_allocated beside it);
- with more than one GPU, data_parallel_size = all of them gives the same samples as one replica.
Prints one JSON object and writes it to $OUT/gpu_check.json when OUT is set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def used_mib() -> list[int]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [int(x) for x in out.split()]


def main() -> None:
    import torch
    from probes.real_models import ARCHITECTURES, build_tiny

    from leafe.backends import SamplingParams, backend_for
    from leafe.backends.base import release_memory
    from leafe.chat import ChatFormat, Conversation
    from leafe.settings import GenerationSettings

    assert torch.cuda.is_available(), "no CUDA device"
    root = Path(sys.argv[1])
    report: dict = {"gpus": torch.cuda.device_count(), "device": torch.cuda.get_device_name(0), "models": {}}
    opening = [{"role": "system", "content": "You play Sokoban."}, {"role": "user", "content": "Board:\n#@$.#"}]
    for name in ARCHITECTURES:
        model = str(build_tiny(name, root / name))
        row: dict = {}
        results = {}
        for engine in ("hf", "vllm"):
            before = used_mib()
            started = time.perf_counter()
            backend = backend_for(model, GenerationSettings(backend=engine, dtype="bfloat16", max_model_len=4096,
                                                            gpu_memory_utilization=0.3))
            fmt = ChatFormat(backend.tokenizer, stop_ids=backend.stop_ids, date_string="26 Jul 2024")
            prompt = Conversation.start(fmt, opening).prompt_ids()
            greedy = backend.generate([prompt] * 4, SamplingParams(temperature=0.0, max_new_tokens=32))
            stop = greedy[0][0].token_ids[5]
            stopped = backend.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=32,
                                                                stop_token_ids=fmt.stop_token_ids + (stop,)))[0][0]
            running = used_mib()
            backend.close()
            del backend
            release_memory()
            time.sleep(2)
            results[engine] = [c.token_ids for row_ in greedy for c in row_]
            row[engine] = {"s": round(time.perf_counter() - started, 1), "stopped_at": len(stopped.token_ids),
                           "finish": stopped.finish_reason, "used_mib_before": before, "used_mib_running": running,
                           "used_mib_after_close": used_mib(),
                           "this_process_allocated_mib": torch.cuda.memory_allocated() // 2**20}
        row["greedy_identical"] = results["hf"] == results["vllm"]
        row["identical_prefix"] = min(next((i for i, (a, b) in enumerate(zip(h, v)) if a != b), len(h))
                                      for h, v in zip(results["hf"], results["vllm"]))
        report["models"][name] = row
    if torch.cuda.device_count() > 1:
        model = str(root / "qwen2.5")
        samples = {}
        for dp in (1, torch.cuda.device_count()):
            backend = backend_for(model, GenerationSettings(backend="vllm", dtype="bfloat16", data_parallel_size=dp,
                                                            max_model_len=2048, gpu_memory_utilization=0.3))
            rows = backend.generate([[151644, 872, 198, 100 + i, 151645, 198, 151644, 77091, 198] for i in range(16)],
                                    SamplingParams(n=4, max_new_tokens=16, seed=7))
            samples[dp] = [[c.token_ids for c in r] for r in rows]
            backend.close()
        report["data_parallel_same_samples"] = samples[1] == samples[torch.cuda.device_count()]
    text = json.dumps(report, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)


if __name__ == "__main__":  # vLLM spawns processes that re-import the main module
    main()
