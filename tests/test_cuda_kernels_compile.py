"""Compile every CUDA kernel file (csrc/attention/*.cu) with nvcc for sm_80 and sm_90a, without a
GPU: no register spills, and tensor-core (HMMA) instructions in the SASS of every matmul kernel
(the tiled kernels and the short-sequence ones, fwd_short5/17 and bwd_short5/17 by most warps).
Prints the ptxas resource report (registers, spills) and each kernel's dynamic shared memory.

Skipped when nvcc or cuobjdump (shipped in the triton wheel) is missing.
"""
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "csrc" / "attention"
ARCHS = ("sm_80", "sm_90a")
# The flags torch's CUDAExtension adds: the kernels must not rely on implicit half conversions.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def _nvcc():
    for cand in (shutil.which("nvcc"), "/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc",
                 os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(cand) if cand.exists() else None


NVCC, CUOBJDUMP = _nvcc(), _cuobjdump()
pytestmark = pytest.mark.skipif(NVCC is None or CUOBJDUMP is None, reason="needs nvcc and cuobjdump")


def _smem_bytes(kind, D, elem=2, max_warps=None):
    """Dynamic shared memory per CTA; mirrors FwdConfig (fwd_kernel.cuh), BwdConfig and
    BwdSmallConfig (bwd_kernels.cuh) and ShortConfig (short_kernels.cuh, at the most rows an
    instantiation takes, 16 * max_warps; the backward with dS^T kept when it fits 112 KiB)."""
    pitch, m = D + 8, 64
    if kind in ("fwd_short", "bwd_short"):
        r = 16 * max_warps
        if kind == "fwd_short":  # Q, K, V
            return 3 * r * pitch * elem
        tiles = 4 * r * pitch * elem + 2 * r * 4  # Q, K, V, dO + lse, delta
        ds = r * (r + 8) * elem
        return tiles + ds if tiles + ds <= 112 * 1024 else tiles
    n = 64 if kind == "fwd" or D <= 64 else 32
    if kind == "fwd":  # Q + two stages of (K, V)
        return (m + 4 * 64) * pitch * elem
    if kind == "bwd_dkdv":  # K, V + two stages of (Q, dO) and of (lse, delta)
        return (2 * m + 4 * n) * pitch * elem + 4 * n * 4
    if kind == "bwd_dq":  # Q, dO + two stages of (K, V)
        return (2 * m + 4 * n) * pitch * elem
    if kind == "bwd_small":
        return (5 * pitch + m + 8) * m * elem + 2 * m * 4
    return 0


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_NAME = re.compile(r"attention_(\w+?)_kernelI(?:6__half|13__nv_bfloat16)(?:Li(\d+)E)?(?:Li(\d+)E)?")


def _short(mangled):
    """(kind, D, dtype), the kind of a short kernel suffixed with its most warps (fwd_short17)."""
    m = _NAME.search(mangled)
    dtype = "bf16" if "bfloat16" in mangled else "fp16"
    if not m:
        return mangled, None, dtype
    return m.group(1) + (m.group(3) or ""), int(m.group(2)) if m.group(2) else None, dtype


def _smem_of(kind, D):
    m = re.fullmatch(r"(fwd_short|bwd_short)(\d+)", kind)
    return _smem_bytes(m.group(1), D, max_warps=int(m.group(2))) if m else _smem_bytes(kind, D)


def _compile(cu, outdir):
    obj = outdir / (cu.stem + ".o")
    cmd = [NVCC, "-c", "-std=c++17", "-O3", *TORCH_NVCC_DEFINES, "-Xptxas", "-v", "-o", str(obj), str(cu)]
    for arch in ARCHS:
        cmd.insert(1, f"-gencode=arch=compute_{arch[3:]},code={arch}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed on {cu.name}:\n{proc.stderr}"
    return cu, obj, proc.stderr


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("cuda_objs")
    sources = sorted(KERNEL_DIR.glob("*.cu"))
    assert sources, f"no .cu files in {KERNEL_DIR}"
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(lambda cu: _compile(cu, outdir), sources))


def _report(ptxas_log):
    """[(kernel, arch, registers, stack, spill stores, spill loads)] from nvcc -Xptxas -v."""
    rows, cur = [], None
    for line in ptxas_log.splitlines():
        if m := _ENTRY.search(line):
            cur = {"kernel": m.group(1), "arch": m.group(2)}
        elif cur is not None and (m := _SPILL.search(line)):
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        elif cur is not None and (m := _REGS.search(line)):
            cur["regs"] = int(m.group(1))
            rows.append(cur)
            cur = None
    return rows


def test_no_register_spills(compiled):
    print()
    print(f"{'kernel':<12}{'D':>5} {'dtype':<6}{'arch':<8}{'regs':>6}{'stack':>7}{'spill st/ld':>13}{'smem B':>9}")
    bad = []
    for cu, _, log in compiled:
        rows = _report(log)
        assert rows, f"no ptxas report for {cu.name}"
        for r in rows:
            kind, D, dtype = _short(r["kernel"])
            smem = _smem_of(kind, D) if D else 0
            print(f"{kind:<12}{D or '-':>5} {dtype:<6}{r['arch']:<8}{r['regs']:>6}{r['stack']:>7}"
                  f"{r['spill_st']:>7}/{r['spill_ld']:<5}{smem:>9}")
            if r["spill_st"] or r["spill_ld"]:
                bad.append(f"{kind} D={D} {dtype} {r['arch']}")
    assert not bad, f"register spills in: {bad}"


def test_tensor_core_instructions(compiled):
    missing, counts = [], {}
    for cu, obj, _ in compiled:
        sass = subprocess.run([CUOBJDUMP, "--dump-sass", str(obj)], capture_output=True, text=True, check=True).stdout
        arch, fn = None, None
        for line in sass.splitlines():
            if m := re.search(r"arch = (sm_\w+)", line):
                arch = m.group(1)
            elif m := re.search(r"Function : (\S+)", line):
                fn = (m.group(1), arch)
                counts[fn] = 0
            elif fn is not None and "HMMA" in line:
                counts[fn] += 1
    assert counts, "no SASS functions found"
    for (name, arch), n in sorted(counts.items()):
        kind, D, dtype = _short(name)
        if kind == "bwd_delta":  # a row reduction: no matmul
            continue
        print(f"{kind} D={D} {dtype} {arch}: {n} HMMA")
        if n == 0:
            missing.append(f"{kind} D={D} {dtype} {arch}")
    assert not missing, f"no HMMA in {missing}"
    archs = {arch for (_, arch) in counts}
    assert archs == set(ARCHS), archs
    # The short-sequence kernels exist for every head dim, both dtypes and both archs.
    for arch in ARCHS:
        for direction in ("fwd", "bwd"):
            dims = {_short(name)[1] for (name, a) in counts if a == arch and _short(name)[0].startswith(direction + "_short")}
            assert dims == {32, 64, 80, 128}, (arch, direction, dims)


# Minimal stand-ins for the two c10 CUDA headers the binding uses (the CPU torch build ships
# none), with the real signatures, so the WITH_CUDA branch of the binding is at least compiled.
_STUB_HEADERS = {
    "c10/cuda/CUDAStream.h": """#pragma once
#include <cuda_runtime_api.h>
#include <c10/core/Device.h>
namespace c10 { namespace cuda {
struct CUDAStream { cudaStream_t stream() const { return nullptr; } };
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex device_index = -1) { return {}; }
} }
""",
    "c10/cuda/CUDAGuard.h": """#pragma once
#include <c10/core/Device.h>
namespace c10 { namespace cuda { struct CUDAGuard { explicit CUDAGuard(c10::Device) {} }; } }
""",
}


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_binding_cuda_branch_compiles(tmp_path):
    """Syntax-check csrc/attention_binding.cpp with WITH_CUDA against torch's headers."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    for rel, text in _STUB_HEADERS.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    cuda_include = next((inc for inc in (Path(os.environ.get("CUDA_HOME", "/nonexistent")) / "include",
                                         Path("/usr/local/cuda/include"),
                                         Path(os.path.realpath(NVCC)).parents[1] / "include")
                         if (inc / "cuda_runtime_api.h").exists()), None)
    if cuda_include is None:
        pytest.skip("CUDA runtime headers not found (set CUDA_HOME)")
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-DWITH_CUDA", f"-I{tmp_path}", f"-I{cuda_include}",
           *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}",
           f"-I{ROOT / 'csrc'}", str(ROOT / "csrc" / "attention_binding.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
