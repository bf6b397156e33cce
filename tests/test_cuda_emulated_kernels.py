"""Run the production CUDA attention kernels on a CPU emulator (csrc/attention/emulator/), without
a GPU: the same .cuh source, launchers and dispatch, with mma.sync / ldmatrix / shuffles emulated
per the PTX ISA's documented fragment layouts, each CTA on its CPU threads (128, or 32 per 16 rows
for the short-sequence kernels). Checks index math, tail masking, the small-N and blocked backward
paths, the short-sequence kernels (kernels=short: every head dim at N in SHORT_NS, their fallback
to the tiled kernels past the N they cover, both dQ variants), strided qkv rows and that every
output element is written (outputs start NaN-filled), against a float64 reference.

Skipped when g++ (C++20) or the CUDA headers (cuda_fp16.h) are missing.
"""
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU_DIR = ROOT / "csrc" / "attention" / "emulator"


def _cuda_include():
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", "/usr/local/cuda-13.0"):
        if base and (Path(base) / "include" / "cuda_fp16.h").exists():
            return str(Path(base) / "include")
    nvcc = shutil.which("nvcc") or "/usr/local/bin/nvcc"
    if os.path.exists(nvcc):
        inc = Path(os.path.realpath(nvcc)).parents[1] / "include"
        if (inc / "cuda_fp16.h").exists():
            return str(inc)
    return None


CXX = shutil.which("g++") or shutil.which("c++")
CUDA_INCLUDE = _cuda_include()
pytestmark = pytest.mark.skipif(CXX is None or CUDA_INCLUDE is None, reason="needs g++ and the CUDA headers")

# (B, N, H, D, dtype 0=fp16 1=bf16, qkv row padding): both backward paths, every head dim, tails.
CASES = [
    (1, 1, 1, 32, 0, 0),
    (2, 7, 2, 32, 1, 8),
    (1, 50, 2, 64, 1, 16),  # one-kernel backward (N <= 64, D <= 64)
    (3, 64, 1, 64, 0, 0),
    (1, 65, 1, 80, 0, 0),
    (1, 130, 1, 32, 0, 8),  # blocked backward, three key/query blocks
    (1, 129, 1, 128, 1, 0),
    (1, 70, 1, 64, 0, 0),
]
# Re-run with cp.async copies completed at the wait instead of at issue (see cuda_emulator.h).
DEFERRED = [(2, 7, 2, 32, 1, 8), (1, 65, 1, 80, 0, 0), (1, 130, 1, 32, 0, 8), (1, 70, 1, 64, 0, 0)]

# The short-sequence kernels (MAE_FAST_ATTENTION_KERNELS=short; emulator argument 2): every head
# dim x these N, the dtype and qkv row padding alternating. 300 is past every short kernel's N
# (the tiled fallback); at D >= 64 the backward covers N <= 80, the forward N <= 272 (D = 128:
# N <= 80); at D = 32, N = 196, 197 and 257 take the dQ variant that recomputes S and dP.
SHORT_NS = (1, 7, 50, 65, 196, 197, 257, 300)
SHORT_CASES = [(2 if N <= 65 else 1, N, 2 if N <= 7 else 1, D, i % 2, 8 * (i % 3))
               for i, (D, N) in enumerate((D, N) for D in (32, 64, 80, 128) for N in SHORT_NS)]
SHORT_DEFERRED = [(1, 50, 2, 64, 1, 0), (2, 65, 1, 80, 0, 8), (1, 197, 1, 32, 1, 0), (1, 257, 1, 32, 0, 0)]
TILED, SHORT = 1, 2


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    exe = tmp_path_factory.mktemp("emu") / "emulate"
    cmd = [CXX, "-std=c++20", "-O2", "-pthread", f"-I{EMU_DIR}", f"-I{EMU_DIR.parent}", f"-I{CUDA_INCLUDE}",
           str(EMU_DIR / "emulate_main.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 and any(s in proc.stderr for s in ("c++20", "<barrier>", "barrier: No such")):
        pytest.skip(f"the compiler lacks C++20 <barrier>: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def test_emulated_kernels_match_float64(emulator):
    runs = [(case, False, 0) for case in CASES] + [(case, True, 0) for case in DEFERRED]
    runs += [(case, False, SHORT) for case in SHORT_CASES] + [(case, True, SHORT) for case in SHORT_DEFERRED]
    runs += [((1, 50, 1, 64, 0, 0), False, TILED)]

    def run(item):
        case, deferred, kernels = item
        args = [str(x) for x in case] + [str(sum(case)), str(kernels)]
        env = dict(os.environ, MAE_FAST_EMU_DEFERRED="1" if deferred else "0")
        return subprocess.run([str(emulator), *args], capture_output=True, text=True, timeout=600, env=env)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, runs))
    print()
    failed = []
    for (case, deferred, kernels), proc in zip(runs, results):
        print(("deferred copies: " if deferred else "") + (proc.stdout.strip() or proc.stderr.strip()))
        if proc.returncode != 0:
            failed.append((case, deferred, kernels, proc.stdout + proc.stderr))
    assert not failed, failed
