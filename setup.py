"""Build script: metadata lives in pyproject.toml; this file builds the C++/CUDA extension
``mae_fast._C`` (see csrc/): the CUDA kernels too when torch is a CUDA build and nvcc is found,
the C++ part (the CPU twin) alone otherwise.

torch must be importable at build time, so install with ``pip install --no-build-isolation``;
without torch (an isolated build) the package installs without ``_C`` and
``mae_fast/ops/_extension.py`` JIT-builds the extension on first use instead.
Environment: ``MAE_FAST_NO_EXTENSION=1`` skips the extension; ``MAE_FAST_CPU_ONLY=1`` leaves out
the CUDA kernels; ``MAE_FAST_CUDA_ARCHS`` (e.g. ``90a``) picks the archs; ``MAX_JOBS`` caps the parallel compile jobs (ninja).
"""
import os
import runpy
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# The gencode flags, shared with the JIT build; loaded by path so that setup.py imports no package.
_build = runpy.run_path(str(ROOT / "mae_fast" / "_build.py"))


def extension_kwargs() -> dict:
    if os.environ.get("MAE_FAST_NO_EXTENSION", "") not in ("", "0"):
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("mae_fast: torch is not importable at build time; skipping mae_fast._C "
              "(it is JIT-built on first use; use --no-build-isolation to build it now)")
        return {}
    cpp = ["csrc/attention_binding.cpp", "csrc/attention_cpu.cpp"]
    cu = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "attention").glob("*.cu"))
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("MAE_FAST_CPU_ONLY", "") in ("", "0"))
    cxx = ["-O3"]  # torch adds its own -std (c++17 or c++20)
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "mae_fast._C", cpp + cu, include_dirs=[str(ROOT / "csrc")],
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", *_build["nvcc_gencode"]()]})
    else:
        ext = cpp_extension.CppExtension("mae_fast._C", cpp, include_dirs=[str(ROOT / "csrc")],
                                         extra_compile_args={"cxx": cxx})
    print(f"mae_fast: building mae_fast._C ({'C++ and CUDA' if with_cuda else 'C++ only'})")
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**extension_kwargs())
