"""Run by tests/test_real_models.py inside .venv-vllm: for each tiny real-architecture model, the vllm
backend's greedy ids on the given prompts, and where it stops when one id it would generate is made a
stop id; one JSON line for the test to compare with the hf backend."""

from __future__ import annotations

import json
import sys

from leafe.backends import SamplingParams, load_backend

if __name__ == "__main__":  # vLLM spawns workers that re-import the main module
    job = json.loads(open(sys.argv[1]).read())
    out = {}
    for name, spec in job.items():
        backend = load_backend("vllm", spec["model"], max_model_len=2048, kv_cache_gb=1, enforce_eager=True)
        greedy = backend.generate(spec["prompts"], SamplingParams(temperature=0.0, max_new_tokens=spec["tokens"]))
        stopped = backend.generate(spec["prompts"][:1], SamplingParams(
            temperature=0.0, max_new_tokens=spec["tokens"], stop_token_ids=tuple(spec["stop"])))
        out[name] = {"greedy": [row[0].token_ids for row in greedy], "stop_ids": list(backend.stop_ids),
                     "stopped": stopped[0][0].token_ids, "finish": stopped[0][0].finish_reason}
        backend.close()
    print(json.dumps(out))
