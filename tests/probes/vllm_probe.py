"""Run by tests/test_backend_vllm.py inside .venv-vllm (vLLM's own pins): drives the vllm backend on a
model and prints what it sampled as one JSON line, for the test to check against the hf backend."""

from __future__ import annotations

import json
import sys

from leafe.backends import SamplingParams, load_backend
from leafe.chat import ChatFormat

if __name__ == "__main__":  # vLLM spawns workers that re-import the main module
    model, prompt_file = sys.argv[1], sys.argv[2]
    with open(prompt_file) as f:
        prompts = json.loads(f.read())
    backend = load_backend("vllm", model, max_model_len=1024, kv_cache_gb=1)
    stop = ChatFormat(backend.tokenizer).end_of_turn_id
    out = {"max_context": backend.max_context}
    greedy = backend.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=16))
    out["greedy"] = [row[0].token_ids for row in greedy]
    sampled = backend.generate(prompts, SamplingParams(n=4, max_new_tokens=24, logprobs=True, stop_token_ids=(stop,)))
    out["sampled"] = [[{"ids": c.token_ids, "text": c.text, "finish": c.finish_reason, "logprobs": c.logprobs}
                       for c in row] for row in sampled]
    again = backend.generate(prompts, SamplingParams(n=4, max_new_tokens=24, logprobs=True, stop_token_ids=(stop,)))
    out["next_call_differs"] = [c.token_ids for row in again for c in row] != [c.token_ids for row in sampled for c in row]
    # Branches of one node: a long shared history h_tau, then each its own experience.
    backend.stats.reset()
    history = prompts[0] * (300 // len(prompts[0]) + 1)
    branches = [history + [5 + i, 6 + i, 7 + i] for i in range(4)]
    backend.generate(branches[:1], SamplingParams(max_new_tokens=4))
    backend.generate(branches[1:], SamplingParams(max_new_tokens=4))
    out["branch_stats"] = backend.stats.as_dict()
    out["shared"] = len(history)
    backend.close()
    print(json.dumps(out))
