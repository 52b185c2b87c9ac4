#!/usr/bin/env bash
# The accelerator benchmark as one prepared script (about 8 minutes on one H100), most important
# case first; every case is appended to $OUT/<name>.jsonl as soon as it finishes, so a run cut
# short keeps what it measured. Synthetic data, no tensorflow-datasets import.
#
#   OUT=/tmp/bench bash experiments/gpu_bench.sh [path/to/anchor_bench.py]
#
# Needs jax with its GPU/TPU plugin, flax, optax, chex, absl-py, ml_collections and matplotlib
# (orbax and tensorflow-datasets are not imported). An optional first argument runs a PyTorch
# per-agent-loop anchor script afterwards, for the record beside these numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/drt_jax_bench}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
bench() {  # name, then benchmark flags
  local name="$1"; shift
  echo "=== $name: $*"
  timeout "${CASE_TIMEOUT:-150}" "$PY" experiments/benchmark.py --data_memory= --combine_ks= \
    --out "$OUT/$name.json" "$@" 2>&1 | grep -E "^\||img/s|error|Error" | tail -30
}
"$PY" -c "import jax; print(jax.devices())"
# 1. ResNet-20, K = 64, 32 img/agent: fp32 and bf16 against the single model (the targets).
bench resnet20_k64_fp32 --models resnet20 --ks 64 --backends vmap,map --steps 10 --warmup 2 \
  --case_budget_s 15
bench resnet20_k64_bf16 --models resnet20 --ks 64 --backends vmap --precision bfloat16 \
  --steps 10 --warmup 2 --case_budget_s 15
# 2. Scaling in K (fp32 and bf16), and 1,024 agents with 16 img/agent.
bench resnet20_k16_256_bf16 --models resnet20 --ks 16,256 --backends vmap --precision bfloat16 \
  --steps 5 --warmup 1 --case_budget_s 10
bench resnet20_k1024_b16 --models resnet20 --ks 1024 --batch 16 --backends vmap \
  --precision bfloat16 --steps 3 --warmup 1 --case_budget_s 10 --compare=
# 3. The small CNN, and the combine alone up to K = 1,024.
bench cnn_k64_256 --models cnn --ks 64,256 --backends vmap --steps 10 --warmup 2 \
  --case_budget_s 10
timeout 120 "$PY" experiments/benchmark.py --models mlp --ks 4 --backends vmap --steps 2 \
  --warmup 1 --compare= --data_memory= --combine_ks 16,64,256,1024 --out "$OUT/combine.json" \
  2>&1 | grep -A8 "combine alone"
if [[ $# -ge 1 && -f "$1" ]]; then
  echo "=== anchor: $1"
  timeout 180 "$PY" "$1" 2>&1 | tail -20 | tee "$OUT/anchor.txt"
fi
