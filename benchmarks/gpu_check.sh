#!/usr/bin/env bash
# Issues 25, 26 and 37's GPU check: FSDP2 over every GPU, LoRA under FSDP2, bf16, in-memory weight sync
# (benchmarks/gpu_check_sharded.py, first); hf == vllm in bf16 on the tiny real-template models, GPU memory handed
# back when an engine closes, vLLM replicas, a short `leafe run` with generation.backend: vllm; then
# GRPO with its vLLM engine colocated (asleep during updates, synced after each) and a study whose
# GRPO and distillation train in bf16 on CUDA. About 10 minutes on one GPU; no network.
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

# Issue 37 first (about 4 minutes): FSDP2 over every visible GPU (one update equal to one process's),
# GRPO with LoRA under FSDP2 in bf16 on an hf copy and on vLLM, both synced in memory.
echo "== sharded training: FSDP2 over every GPU, LoRA, bf16, in-memory sync"
timeout 360 "$PYTHON" benchmarks/gpu_check_sharded.py "$WORK"

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

echo "== GRPO, rollouts on a colocated vLLM engine, 2 steps in bf16"
VLLM_OPTS=(--backend vllm --dtype bfloat16 --max-model-len 4096 --gpu-memory-utilization 0.3)
timeout 300 "$PYTHON" -m leafe train grpo --model "$WORK/models/qwen2.5" --out "$WORK/grpo" "${VLLM_OPTS[@]}" \
  --steps 2 --tasks 4 --tasks-per-step 2 --group-size 4 --max-new-tokens 16 --env-param max_steps=4 \
  --invalid-penalty 0.1 --save-every 1
cp "$WORK/grpo/log.jsonl" "$OUT/gpu_check_grpo_log.jsonl"
# sampler_gap: the engine's log-probs of what it sampled against the trainer's (bf16 on both sides:
# ~1e-2 expected; a missed sync shows as the size of an update). The saved model must be bf16.
"$PYTHON" - "$WORK/grpo" <<'PY'
import json, sys
from pathlib import Path
from safetensors import safe_open
out = Path(sys.argv[1])
for line in (out / "log.jsonl").read_text().splitlines():
    r = json.loads(line)
    print({k: r.get(k) for k in ("step", "sampler_gap", "is_weight", "is_capped", "sync_s", "rollout_s", "wall_s")})
with safe_open(str(out / "model.safetensors"), "pt") as f:
    dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}
print("saved dtypes", dtypes)
assert dtypes == {"torch.bfloat16"}, dtypes
PY

echo "== leafe run: GRPO on vllm and distillation, bf16 on CUDA"
cat > "$WORK/study-train.yaml" <<EOF
name: gpu-check-train
model: $WORK/models/qwen2.5
methods: [base, grpo, leafe]
env_params: {max_steps: 4}
train: {tasks: 4}
eval: {tasks: 4, samples: 8, max_new_tokens: 16}
grpo: {steps: 2, tasks_per_step: 2, group_size: 4, max_new_tokens: 16, invalid_penalty: 0.1}
leafe: {explore: {tasks: 2, budget: 8, max_new_tokens: 16, reflection_tokens: 16}, sft: {epochs: 1}}
generation: {backend: vllm, dtype: bfloat16, max_model_len: 4096, gpu_memory_utilization: 0.3}
EOF
timeout 300 "$PYTHON" -m leafe run "$WORK/study-train.yaml" --out "$WORK/run-train"
cp "$WORK/run-train/results.json" "$OUT/gpu_check_train_results.json"
"$PYTHON" - "$WORK/run-train" <<'PY'
import sys
from pathlib import Path
from safetensors import safe_open
for stage in ("grpo/train", "leafe/distill"):  # checkpoints a user keeps: bf16, as trained
    path = Path(sys.argv[1]) / stage / "model.safetensors"
    if path.exists():
        with safe_open(str(path), "pt") as f:
            print(stage, {str(f.get_tensor(k).dtype) for k in f.keys()})
PY
nvidia-smi --query-gpu=memory.used --format=csv
echo "gpu check done: $OUT"
