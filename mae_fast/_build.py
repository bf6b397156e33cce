"""Build settings shared by setup.py and the JIT build (no imports: setup.py loads this file alone)."""
import os

# sm_80 covers A100 and (forward-compatible) the other sm_8x cards; sm_90a is H100/H200; the
# compute_90 PTX lets newer cards JIT-compile the kernels.
DEFAULT_ARCHS = ("80", "90a", "90+PTX")
ARCHS_ENV = "MAE_FAST_CUDA_ARCHS"  # e.g. "90a" for a quicker build for one card


def nvcc_gencode() -> list[str]:
    """The ``-gencode`` flags for the archs in ``MAE_FAST_CUDA_ARCHS`` (comma-separated), or the defaults."""
    archs = [a.strip() for a in os.environ.get(ARCHS_ENV, "").split(",") if a.strip()] or list(DEFAULT_ARCHS)
    flags = []
    for arch in archs:
        num = arch.removesuffix("+PTX")
        code = f"compute_{num}" if arch.endswith("+PTX") else f"sm_{num}"
        flags.append(f"-gencode=arch=compute_{num},code={code}")
    return flags
