#!/usr/bin/env bash
# The one GPU entry point (../shared/DEVICE.md): in one run, under 8 minutes on an H100/H200,
#   1. the card and versions;  2. build the extension (timed);  3. the whole test suite;
#   4. the benchmarks (ops, attention, model: ViT-B and ViT-L bf16 with the CUDA-graph row, ViT-L's
#      kernels by kind, the decoder ablation, the compiled rows);  5. compute-sanitizer memcheck;
#   6. a short table last. Each step writes its JSON as it ends into a scratch folder, and
#      suites.tar.gz in OUTDIR is re-packed after every step: a run cut short keeps every step that
#      ended, and OUTDIR never holds more than 4 files (the 8-file rule: log, suites.tar.gz, and at
#      the end results.json, all suites merged, and summary.md).
# On a machine without CUDA it runs the same steps with the GPU parts skipped (CI runs it so).
#
# usage: benchmarks/device_check.sh [OUTDIR]     (or DEVICE_CHECK_OUT=...; default benchmarks/results/latest)
# env:   PY (python, default python3)   DEVICE_CHECK_SKIP_TESTS=1 (skip step 3; CI sets it: it runs them)
#        DEVICE_CHECK_SKIP_BUILD=1 (skip the install in step 2: the package is already installed)
#        DEVICE_CHECK_BUDGET_S (default 470): no step runs past it; the most telling steps run first
#        MAE_FAST_CUDA_ARCHS (default 90a where CUDA is: the H100/H200 arch alone, a quicker build)
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${DEVICE_CHECK_OUT:-benchmarks/results/latest}}
PY=${PY:-python3}
mkdir -p "$OUTDIR"
rm -f "$OUTDIR"/bench_*.json "$OUTDIR/suites.tar.gz"
LOG="$OUTDIR/device_check.log"
: > "$LOG"
SUITES=$(mktemp -d)  # the per-step JSONs; packed into OUTDIR/suites.tar.gz after each step
trap 'rm -rf "$SUITES"' EXIT
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
declare -A STATUS

say() { echo "$@" | tee -a "$LOG"; }
BUDGET=${DEVICE_CHECK_BUDGET_S:-470}
step() {  # step NAME TIMEOUT_S CMD... : run, log, record ok/FAILED/TIMEOUT and the seconds taken
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 15 ]; then STATUS[$name]="not run (time budget of ${BUDGET}s spent)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  say ""; say "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0))
  case $rc in 0) STATUS[$name]="ok (${took}s)";; 124) STATUS[$name]="TIMEOUT after ${limit}s";;
              *) STATUS[$name]="FAILED rc=$rc (${took}s)";; esac
  say "--- $name: ${STATUS[$name]}"
  if ls "$SUITES"/bench_*.json >/dev/null 2>&1; then tar czf "$OUTDIR/suites.tar.gz" -C "$SUITES" .; fi
}

HAS_CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
[ "$HAS_CUDA" = 1 ] && export MAE_FAST_CUDA_ARCHS=${MAE_FAST_CUDA_ARCHS:-90a}

# 1. the machine
step info 60 bash -c "nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi: CPU machine'; \
  $PY -c 'import torch, platform; print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda); \
import importlib.util as u; t = u.find_spec(\"triton\"); print(\"triton\", __import__(\"triton\").__version__ if t else None)'"

# 2. the extension: an editable install builds mae_fast._C (CUDA kernels where torch has CUDA)
if [ "${DEVICE_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  STATUS[build]="skipped (DEVICE_CHECK_SKIP_BUILD=1)"
else
  step build 300 $PY -m pip install -q --no-deps --no-build-isolation -e .
fi
step ext_load 120 $PY -c "from mae_fast import ops; print('extension:', ops.extension_status())"

# 3. the GPU-marked tests first (the kernels' correctness); the rest of the suite comes last
XDIST=$($PY -c "import xdist; print('-n 8')" 2>/dev/null || true)
PYTEST="$PY -m pytest -q -p no:cacheprovider --timeout 120 -o addopts= -rfE $XDIST"
if [ "${DEVICE_CHECK_SKIP_TESTS:-0}" = 1 ]; then
  STATUS[tests_gpu]="skipped (DEVICE_CHECK_SKIP_TESTS=1)"
elif [ "$HAS_CUDA" = 1 ]; then
  step tests_gpu 200 $PYTEST -m gpu
fi

# 4. benchmarks: JSON per suite, merged into results.json below; the headline figure first
if [ "$HAS_CUDA" = 1 ]; then
  step model_vit_l 150 $PY -m mae_fast.cli bench --model mae_vit_large_patch16 --batch-size 256 \
    --variants torch,auto,auto+graphs,encoder_mask_tokens,hf_sdpa --json "$SUITES/bench_model_vit_l.json"
  # the fine-tuning step (all 197 tokens, no masking) beside HF ViTForImageClassification sdpa: issue 13's goal
  step finetune_vit_l 150 $PY -m mae_fast.cli bench --task finetune --model vit_large_patch16 --batch-size 256 \
    --json "$SUITES/bench_finetune_vit_l.json"
else
  step finetune_tiny 120 $PY -m mae_fast.cli bench --task finetune --img-size 64 --batch-size 2 --warmup 0 \
    --repeats 1 --json "$SUITES/bench_finetune_tiny.json"
fi
step bench_ops 120 $PY benchmarks/bench_ops.py --kernels --json "$SUITES/bench_ops.json"
step bench_attention 150 $PY benchmarks/bench_attention.py --json "$SUITES/bench_attention.json"
if [ "$HAS_CUDA" = 1 ]; then
  step kernels_vit_l 90 $PY -m mae_fast.cli profile --kernels --model mae_vit_large_patch16 --batch-size 256 \
    --json "$SUITES/bench_kernels_vit_l.json"
  step model_vit_b 120 $PY -m mae_fast.cli bench --model mae_vit_base_patch16 --batch-size 256 \
    --variants torch,auto,auto+graphs,encoder_mask_tokens,hf_eager,hf_sdpa --json "$SUITES/bench_model_vit_b.json"
  step profile_vit_l 60 $PY -m mae_fast.cli profile --model mae_vit_large_patch16 --batch-size 256
else
  step model_tiny 240 $PY -m mae_fast.cli bench --img-size 64 --batch-size 2 --warmup 0 --repeats 1 \
    --variants torch,auto,auto+graphs,encoder_mask_tokens --json "$SUITES/bench_model_tiny.json"
  STATUS[kernels_vit_l]="skipped (profile --kernels needs CUDA)"
fi

# 5. memory checking of our kernels on small shapes
if [ "$HAS_CUDA" = 1 ] && command -v compute-sanitizer >/dev/null; then
  step memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 3 $PY benchmarks/sanitize_kernels.py
else
  STATUS[memcheck]="skipped (no CUDA or no compute-sanitizer here)"
fi

# the input pipeline on the machine's cores beside the ViT-L step rate (issue 14's goal: >= 3,000 img/s)
if [ "$HAS_CUDA" = 1 ]; then
  step loader_vit_l 90 $PY -m mae_fast.cli bench --synthetic-jpeg 1024 --workers 8,16 --rounds 1 \
    --model mae_vit_large_patch16 --json "$SUITES/bench_loader.json"
fi

# the regional compile (seconds: one graph per block shape), then the decoder depth / width sweeps in
# wall-clock (a small batch, 1 warm-up and 3 timed steps per point), then the whole-model compiles (a
# minute or more each): most telling and cheapest first, each its own step (a timeout loses only itself)
if [ "$HAS_CUDA" = 1 ]; then
  step regional_vit_b 120 $PY -m mae_fast.cli bench --model mae_vit_base_patch16 --batch-size 256 \
    --variants auto,auto+regional --json "$SUITES/bench_model_vit_b_regional.json"
  step ablation_vit_l 150 $PY -m mae_fast.cli bench --model mae_vit_large_patch16 --batch-size 64 --warmup 1 \
    --repeats 2 --variants auto --ablate-decoder --json "$SUITES/bench_ablation_vit_l.json"
  step compile_vit_b 180 $PY -m mae_fast.cli bench --model mae_vit_base_patch16 --batch-size 256 \
    --variants auto+compile,hf_sdpa+compile --json "$SUITES/bench_model_vit_b_compile.json"
else
  step ablation_tiny 120 $PY -m mae_fast.cli bench --model mae_vit_demo_patch8 --img-size 32 --batch-size 1 \
    --warmup 0 --repeats 1 --variants auto --ablate-decoder --decoder-depths 1,2 --decoder-widths 32 \
    --json "$SUITES/bench_ablation_tiny.json"
fi

# 3b. the rest of the suite (CI runs it on every change; here it checks the GPU machine's versions)
if [ "${DEVICE_CHECK_SKIP_TESTS:-0}" = 1 ]; then
  STATUS[tests_rest]="skipped (DEVICE_CHECK_SKIP_TESTS=1)"
else
  step tests_rest 240 $PYTEST -m "not gpu"
fi

# 6. the table; then the per-suite JSONs (all merged into results.json) go into one archive
$PY benchmarks/summarize_results.py "$SUITES" | tee -a "$LOG" "$OUTDIR/summary.md"
[ -s "$SUITES/results.json" ] && mv "$SUITES/results.json" "$OUTDIR/results.json"
say ""
say "step status:"
for k in info build ext_load tests_gpu model_vit_l finetune_vit_l finetune_tiny bench_ops bench_attention kernels_vit_l model_vit_b profile_vit_l \
         model_tiny memcheck loader_vit_l regional_vit_b ablation_vit_l ablation_tiny compile_vit_b tests_rest; do
  [ -n "${STATUS[$k]:-}" ] && say "  $(printf '%-16s' "$k") ${STATUS[$k]}"
done
FAILED=0
for v in "${STATUS[@]}"; do case $v in FAILED*|TIMEOUT*) FAILED=1;; esac; done
exit $FAILED
