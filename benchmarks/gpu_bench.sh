#!/usr/bin/env bash
# The accelerator benchmark as one prepared script (about 8 minutes on one H100 or H200), most
# important case first; every case is appended to $OUT/<name>.jsonl as soon as it finishes, so a run cut
# short keeps what it measured. Synthetic data, no tensorflow-datasets import. BUDGET_S (default
# 480) bounds the whole script: each case gets at most what is left of it.
#
#   OUT=/tmp/bench BUDGET_S=440 bash benchmarks/gpu_bench.sh [path/to/anchor_bench.py]
#
# Needs jax with its GPU/TPU plugin, flax, optax, chex, absl-py, ml_collections and matplotlib
# (orbax and tensorflow-datasets are not imported). An optional first argument runs a PyTorch
# per-agent-loop anchor script (K = 64, 32 img/agent) right after the two main cases, for the
# record beside these numbers. Every case's full log stays in $OUT; put everything into one
# archive with `tar czf bench.tgz -C "$(dirname "$OUT")" "$(basename "$OUT")"`, and give the
# command that runs this script a time limit of at least BUDGET_S + 60 s so the archive is made.
set -uo pipefail
ANCHOR="${1:+$(realpath -m "$1")}"  # before the cd: a relative path is the caller's
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/drt_jax_bench}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
END=$(( $(date +%s) + ${BUDGET_S:-480} ))
left() {  # seconds for a case capped at $1; nothing when under half its cap remains (a case cut
          # before its first timed step measures nothing)
  local left=$(( END - $(date +%s) )) cap="$1"
  (( left < cap / 2 )) && return 1
  echo $(( left < cap ? left : cap ))
}
ran() {  # name, exit status: say when a case did not end cleanly
  case "$2" in
    0) ;;
    124|137) echo "=== $1: cut by its time cap (what it measured is in $OUT/$1*)" ;;
    *) echo "=== $1: exit status $2 (log: $OUT/$1.log)" ;;
  esac
}
bench() {  # name, cap in seconds, then benchmarks/train_step.py's flags
  local name="$1" cap="$2" t; shift 2
  t=$(left "$cap") || { echo "=== $name: skipped (budget spent)"; return; }
  echo "=== $name (<= ${t}s): $*"
  timeout -k 10 "$t" "$PY" -m benchmarks.train_step --out "$OUT/$name.json" "$@" \
    > "$OUT/$name.log" 2>&1
  ran "$name" $?
  # The throughput rows and the device-time-by-kind table (the costliest ops stay in the log).
  grep -E "^\| (model|resnet20|cnn|mlp|category|conv|matmul|reduce|transpose/copy|gather/scatter\
|collective|elementwise|\*\*device busy\*\*|coverage) |^Not in|rror" "$OUT/$name.log" | tail -30
}
# A missing package ends the run here, named, not in every case's log.
"$PY" -c "import jax, flax, optax, chex, absl, ml_collections, matplotlib, drt_jax; \
print(jax.devices(), jax.__version__, flax.__version__, optax.__version__)" || {
  echo "a package is missing (above); e.g. pip install --target /tmp/site <wheel> and"
  echo "PYTHONPATH=/tmp/site"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
# 0. Preflight (seconds): stop at once if the library does not run with this jax (a preflight
#    only slow to start goes on).
timeout -k 10 90 "$PY" -m benchmarks.train_step --smoke --backends vmap,map \
  --out "$OUT/smoke.json" > "$OUT/smoke.log" 2>&1
status=$?
if (( status == 124 || status == 137 )); then
  echo "preflight cut at 90 s; going on (log: $OUT/smoke.log)"
elif (( status != 0 )); then
  tail -25 "$OUT/smoke.log"; echo "preflight failed"; exit 1
fi
# 1. ResNet-20, K = 64, 32 img/agent against the single model (the targets), fp32 and bf16 (with
#    DRT against ATC). The H200 profile of the grouped convs found cuDNN running the kernel
#    gradients (and the strided layers) as one launch per agent (docs/performance.md); these
#    cases compute them otherwise. The single model keeps XLA's convs. First the kernel gradients
#    as one Pallas kernel each (`xla_dw_pallas`, benchmarks/conv_grad.py), later as one matmul of
#    image patches (`xla_dw_matmul`). Timed only: a row is written when its case ends, and
#    profiling (a recompile and traced steps) comes in its own case further down.
bench r20_k64_fp32_pallas 75 --models resnet20 --ks 64 --backends vmap --baselines single \
  --compare= --steps 8 --warmup 2 --case_budget_s 4 --conv xla_dw_pallas --baseline_conv xla
bench r20_k64_bf16_pallas 75 --models resnet20 --ks 64 --backends vmap --baselines single \
  --precision bfloat16 --steps 8 --warmup 2 --case_budget_s 4 --conv xla_dw_pallas \
  --baseline_conv xla --compare=
# The PyTorch per-agent loop (the anchor of the 30x target), in the same run as the cases above.
if [[ -n "$ANCHOR" && ! -f "$ANCHOR" ]]; then
  echo "=== anchor: $ANCHOR is not there; skipped"
elif [[ -n "$ANCHOR" ]] && t=$(left 45); then
  echo "=== anchor: $ANCHOR"
  timeout -k 10 "$t" "$PY" "$ANCHOR" 64 32 5 torch_loop > "$OUT/anchor.log" 2>&1
  ran anchor $?
  tail -3 "$OUT/anchor.log" | tee "$OUT/anchor.txt"
fi
# 1b. 1,024 agents with 16 img/agent, bf16 (the `auto` path): does it fit? XLA's autotuning is
#     off for this case only (a fit question: in an earlier run the case was still compiling
#     after 65 s); the compile log line gives XLA's memory estimate even if the steps are cut.
XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_autotune_level=0" \
bench r20_k1024_b16 100 --models resnet20 --ks 1024 --batch 16 --backends vmap --baselines= \
  --precision bfloat16 --steps 3 --warmup 1 --case_budget_s 4 --compare= --conv xla
grep -h "compiled in" "$OUT/r20_k1024_b16.log" 2>/dev/null | cut -c40-
# 1a. The kernel gradients alone, per ResNet-20 stage: is the compiled Pallas kernel right on
#     this GPU (grad err against the grouped conv's gradients), and how fast per layer?
t=$(left 50) && { timeout -k 10 "$t" "$PY" -m benchmarks.agent_conv --k 64 --batch 32 \
  --reps 10 --formulations single,grouped,dw_taps,dw_pallas --out "$OUT/agent_conv_dw.jsonl" \
  > "$OUT/agent_conv_dw.log" 2>&1; ran agent_conv_dw $?; grep -E "^\|" "$OUT/agent_conv_dw.log"; }
bench r20_k64_fp32_dwmm 80 --models resnet20 --ks 64 --backends vmap --baselines single \
  --compare= --steps 8 --warmup 2 --case_budget_s 4 --conv xla_dw_matmul --baseline_conv xla
bench r20_k64_bf16_dwmm 80 --models resnet20 --ks 64 --backends vmap --baselines single \
  --precision bfloat16 --steps 8 --warmup 2 --case_budget_s 4 --conv xla_dw_matmul \
  --baseline_conv xla --compare=
# 1b'. Where the time goes with the Pallas kernel gradients: 3 more steps of each row under the
#      profiler (recompiled without command buffers, so that every kernel is named by its op).
bench r20_k64_bf16_pallas_profile 80 --models resnet20 --ks 64 --backends vmap \
  --baselines single --precision bfloat16 --steps 4 --warmup 1 --case_budget_s 4 \
  --conv xla_dw_pallas --baseline_conv xla --compare= --profile_steps 3 \
  --profile_dir "$OUT/traces_bf16_pallas"
# 1c. The same with one matmul per kernel tap for the kernel gradient (no patch matrix).
bench r20_k64_bf16_dwtaps 60 --models resnet20 --ks 64 --backends vmap --baselines= \
  --precision bfloat16 --steps 8 --warmup 2 --case_budget_s 4 --conv xla_dw_taps --compare=
# 1d. DRT against ATC on the small CNN, profiled (DRT cost 1.38x ATC at K = 64 on the H200), with
#     both algorithms' own steps timed alone (is it DRT's work or the programs' conv tuning?).
bench cnn_k64_drt 45 --models cnn --ks 64 --backends vmap --baselines= --compare drt \
  --steps 10 --warmup 2 --case_budget_s 3 --conv xla --profile_steps 3
# 1e. A sweep of S = 1, 4, 16 members (seeds) of the small CNN at K = 16, 200 steps each: the
#     members one after another against one vectorised program (drt_jax.vectorize), compile
#     included, each mode and size in a fresh process (target: >= 5x per member at S = 16).
t=$(left 150) && { timeout -k 10 "$t" "$PY" -m benchmarks.sweeps --model cnn --k 16 \
  --sizes 1,4,16 --steps 200 --case_timeout_s 60 --out "$OUT/sweeps.json" > "$OUT/sweeps.log" 2>&1
  ran sweeps $?; grep -E "^(\||Sweep of)" "$OUT/sweeps.log"; }
# 2b. The Pallas kernel's launch settings timed, per stage: conv_grad.LAUNCH's pick (plain
#     `dw_pallas`; picked from Triton's register and shared-memory report by a rule, untimed)
#     against the rule's runners-up, with `grouped` for the gradients' check.
for s in "16x32 32:2:2,dw_pallas@32:1:1" "32x16 16:2:2,dw_pallas@32:2:1" \
         "64x8 64:8:1,dw_pallas@16:8:2"; do
  t=$(left 40) && { timeout -k 10 "$t" "$PY" -m benchmarks.agent_conv --k 64 --batch 32 \
    --reps 10 --stages "${s%% *}" --formulations "grouped,dw_pallas,dw_pallas@${s#* }" \
    --out "$OUT/pallas_launch.jsonl" > "$OUT/pallas_launch_${s%% *}.log" 2>&1
    ran "pallas_launch_${s%% *}" $?
    grep -E "^\| (float32|bfloat16)" "$OUT/pallas_launch_${s%% *}.log"; }
done
# 3. Scaling in K with the kernel gradients as one Pallas kernel, bf16, K = 256.
bench r20_k256_bf16_pallas 70 --models resnet20 --ks 256 --backends vmap --baselines= \
  --compare= --precision bfloat16 --steps 4 --warmup 1 --case_budget_s 4 --conv xla_dw_pallas
# 4. The small CNN from 16 to 1,024 agents, and the combine alone up to K = 1,024.
bench cnn_k16_1024 80 --models cnn --ks 16,64,256,1024 --backends vmap --baselines single \
  --steps 10 --warmup 2 --case_budget_s 3 --conv xla --compare=
t=$(left 40) && { timeout -k 10 "$t" "$PY" -m benchmarks.combine --ks 16,64,256,1024 \
  --out "$OUT/combine.json" > "$OUT/combine.log" 2>&1
  ran combine $?; grep -A8 "combine alone" "$OUT/combine.log"; }
# 5. The per-agent convolution alone: grouped (vmap) vs channel padding vs one matmul per tap.
t=$(left 60) && { timeout -k 10 "$t" "$PY" -m benchmarks.agent_conv --k 64 --batch 32 \
  --formulations single,grouped,padded32,padded64,taps,dw_patches \
  --out "$OUT/agent_conv.jsonl" > "$OUT/agent_conv.log" 2>&1
  ran agent_conv $?; grep -E "^\|" "$OUT/agent_conv.log"; }
# 6. The loop of K jitted single-agent steps (JAX), fp32 (measured before: it compiles for a
#    minute, so it comes last).
bench r20_k64_loop 90 --models resnet20 --ks 64 --backends= --baselines loop --compare= \
  --steps 3 --warmup 1 --case_budget_s 4 --conv xla
echo "=== done, $(( END - $(date +%s) ))s of the budget left"
