"""vLLM replicas change nothing that is sampled: the same call through one engine and through two
(`generation.data_parallel_size: 2`, each replica its own process) gives the same completions, token for
token, at temperature 1. On a CPU both replicas are CPU engines (slow: two engines on the same cores);
on GPUs each gets its own GPU group.

    PYTHONPATH=. VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/vllm_replicas_check.py MODEL_DIR
(MODEL_DIR: e.g. the tiny Qwen2.5 `cd tests && python -m probes.real_models DIR` builds; prompts are Qwen ids.)
"""

import json
import sys
import time

from leafe.backends import SamplingParams, backend_for
from leafe.settings import GenerationSettings

if __name__ == "__main__":
    model = sys.argv[1]
    prompts = [[151644, 872, 198, 100 + i, 200 + i, 151645, 198, 151644, 77091, 198] for i in range(6)]
    sp = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=3)
    out = {}
    for dp in (1, 2):
        t = time.time()
        b = backend_for(model, GenerationSettings(backend="vllm", data_parallel_size=dp, max_model_len=1024, kv_cache_gb=1, enforce_eager=True))
        out[dp] = [[c.token_ids for c in row] for row in b.generate(prompts, sp)]
        b.close()
        print("dp", dp, "s", round(time.time() - t, 1), flush=True)
    print(json.dumps({"identical": out[1] == out[2], "dp1": out[1][:2], "dp2": out[2][:2]}))
