#!/usr/bin/env bash
# The GPU machine's software stack, without its GPU: before device time is spent, build the CUDA
# extension and run the whole CPU test suite against the versions the GPU machine has
# (../shared/FACTS.md: torch 2.11 cu130, triton 3.6), so that a break between those and our
# pinned torch 2.13 / triton 3.9 shows up here instead of in the device check.
#
# usage: benchmarks/gpu_stack_check.sh [VENV]     (default .venv-gpu-stack; ~5 GB: torch's CUDA
#        wheels come from the package registry)    then: 20 s to 2 min to build, ~6-12 min of tests
# env:   TORCH (default 2.11.0)  TRITON (default 3.6.0)  PYTEST_ARGS (extra pytest arguments)
# The CUDA kernels are compiled for sm_90a with the machine's nvcc; the cuBLAS/cuSPARSE headers
# that torch's CUDA headers include come from torch's own nvidia wheels. Nothing runs on a GPU:
# the GPU-marked tests skip, as in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-gpu-stack}
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then python3 -m venv "$VENV"; fi
# numpy <= 2.2: triton 3.6's interpreter breaks on numpy 2.4 (FACTS.md)
"$PY" -m pip install -q "torch==${TORCH:-2.11.0}" "triton==${TRITON:-3.6.0}" "numpy<=2.2" \
  setuptools wheel ninja pybind11 pytest pytest-benchmark pytest-timeout safetensors pillow tqdm \
  matplotlib transformers simplejpeg
NVIDIA_INCLUDE=$("$PY" -c "import glob, os, nvidia; print(':'.join(glob.glob(os.path.join(nvidia.__path__[0], '*', 'include'))))")
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# The editable install builds mae_fast._C in place (next to the sources): it is moved aside after
# the run so that the project's own .venv keeps loading the extension built for its torch.
BUILT=$(ls mae_fast/_C*.so 2>/dev/null || true)
for f in $BUILT; do mv "$f" "$f.keep"; done
restore() {
  rm -f mae_fast/_C*.so
  for f in $BUILT; do mv "$f.keep" "$f"; done
}
trap restore EXIT

time env CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" CPATH="$NVIDIA_INCLUDE${CPATH:+:$CPATH}" \
  MAE_FAST_CUDA_ARCHS=${MAE_FAST_CUDA_ARCHS:-90a} \
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
"$PY" -c "from mae_fast import ops; print('extension:', ops.extension_status())"
"$PY" -m pytest -q -p no:cacheprovider -rfE ${PYTEST_ARGS:-}
