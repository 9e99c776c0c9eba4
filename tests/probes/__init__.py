"""Probes: scripts the tests run in another interpreter, and the tiny real-architecture models.

Not tests (pytest collects nothing here). The vLLM probes run inside .venv-vllm, which pins its own
torch and transformers and has no pytest: a test starts one (`helpers.in_vllm_venv`), the probe
prints one JSON line of what it measured, and the test checks it against the hf backend.

- `vllm_probe`: the vllm backend's greedy ids, samples, stop ids and prefix caching (test_backend_vllm).
- `vllm_real_probe`: greedy ids and stops on the tiny real-architecture models (test_real_models).
- `vllm_grpo_probe`: GRPO with its rollouts on vLLM and the trainer's weights synced in (test_grpo_vllm).
- `vllm_weight_sync_probe`: `VLLMBackend.update_weights`, in memory and from files (test_weight_sync_vllm).
- `real_models`: tiny random-weight Qwen2.5, Qwen3 and Llama-3.1 on their real tokenizers, for the
  tests and the GPU checks in benchmarks/ (`cd tests && python -m probes.real_models OUT` builds all three).

They import each other and `helpers` from tests/ (`in_vllm_venv` puts tests/ on PYTHONPATH).
"""
