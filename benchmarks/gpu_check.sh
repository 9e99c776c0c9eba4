#!/usr/bin/env bash
# Issue 25's GPU check: hf == vllm in bf16 on the tiny real-template models, GPU memory handed back
# when an engine closes, vLLM replicas, and a short `leafe run` with generation.backend: vllm.
# Under 10 minutes on one GPU; no network; nothing large to carry.
#
# Needs: CUDA, a Python with torch, transformers and vllm (GPU build) and leafe importable
# (`pip install -e .` or PYTHONPATH=.), and the real tokenizers: ../shared/data/tokenizers, or a copy
# named by LEAFE_SHARED_DATA (e.g. `cp -r ../shared/data/tokenizers .cache/data/` and
# LEAFE_SHARED_DATA=.cache/data, to carry it to a machine without ../shared: ~25 MB).
#   PYTHON=python bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
WORK=${WORK:-$(mktemp -d)}
OUT=${OUT:-$WORK}
export PYTHONPATH=${PYTHONPATH:-.} OUT
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv

echo "== parity, stop ids, memory, replicas"
timeout 420 "$PYTHON" benchmarks/gpu_check.py "$WORK/models"

echo "== leafe run, generation.backend: vllm"
cat > "$WORK/study.yaml" <<EOF
name: gpu-check
model: $WORK/models/llama3.1
methods: [base, ace]
env_params: {max_steps: 4}
train: {tasks: 4}
eval: {tasks: 4, samples: 8, max_new_tokens: 16}
ace: {tasks: 4, tasks_per_round: 4, max_new_tokens: 16, reflection_tokens: 32}
generation: {backend: vllm, dtype: bfloat16, max_model_len: 4096, gpu_memory_utilization: 0.3}
EOF
timeout 240 "$PYTHON" -m leafe run "$WORK/study.yaml" --out "$WORK/run"
cp "$WORK/run/results.json" "$OUT/gpu_check_results.json"
echo "gpu check done: $OUT"
