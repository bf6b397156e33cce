"""Loading the C++/CUDA extension (``csrc/``), once per process.

``import mae_fast._C`` when the package was built with ``setup.py``, else a JIT build of ``csrc/``
with ``torch.utils.cpp_extension.load`` (with the CUDA kernels when torch has CUDA and nvcc is
found; minutes on first use, cached afterwards). ``MAE_FAST_NO_JIT=1`` disables the JIT build.
The extension registers its ops in ``torch.ops.mae_fast``; the op files add their Python parts
(fake kernels, autograd) through :func:`after_load`.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch

from .._build import nvcc_gencode

log = logging.getLogger("mae_fast")

NO_JIT_ENV = "MAE_FAST_NO_JIT"
CSRC = Path(__file__).resolve().parents[2] / "csrc"

# Plain module globals (read, never written, while torch.compile traces).
_EXT: dict = {"tried": False, "reason": None, "cuda": False, "how": None, "seconds": 0.0}
_AFTER_LOAD: list[Callable[[], None]] = []


def after_load(hook: Callable[[], None]) -> None:
    """Run ``hook`` once the extension's ops are registered (now, if they already are)."""
    _AFTER_LOAD.append(hook)
    if _EXT["tried"] and _EXT["reason"] is None:
        hook()


def _sources(with_cuda: bool) -> list[str]:
    files = [CSRC / "attention_binding.cpp", CSRC / "attention_cpu.cpp"]
    if with_cuda:
        files += sorted((CSRC / "attention").glob("*.cu"))
    return [str(f) for f in files]


def _cuda_build_reason() -> str | None:
    """Why the JIT build leaves out the CUDA kernels (None: they are built)."""
    if torch.version.cuda is None:
        return "torch is a CPU build"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _jit_build(verbose: bool) -> str:
    from torch.utils import cpp_extension

    if not (CSRC / "attention_binding.cpp").exists():
        raise RuntimeError(f"the C++ sources are not at {CSRC} (installed without them? build with setup.py)")
    no_cuda = _cuda_build_reason()
    with_cuda = no_cuda is None
    if not with_cuda:
        log.info("mae_fast: building the attention extension without CUDA kernels: %s", no_cuda)
    cpp_extension.load(
        # The name is also the build directory: keep CPU-only and CUDA builds apart.
        name="mae_fast_attention_cuda" if with_cuda else "mae_fast_attention_cpu",
        sources=_sources(with_cuda),
        extra_cflags=["-O3"] + (["-DWITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=["-O3", "-lineinfo", *nvcc_gencode()],
        extra_include_paths=[str(CSRC)],
        is_python_module=False,  # the ops register themselves in torch.ops.mae_fast
        verbose=verbose,
    )
    return "jit" + ("+cuda" if with_cuda else "")


def _ops_registered() -> bool:
    try:
        torch.ops.mae_fast.attention_fwd  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _prebuilt_is_stale() -> str | None:
    """In a source checkout, a ``mae_fast._C`` older than ``csrc/`` was built from other sources
    (an editable install is not rebuilt on edits): say so rather than run old kernels."""
    spec = importlib.util.find_spec("mae_fast._C")
    if spec is None or not spec.origin or not CSRC.is_dir():
        return None
    sources = [p for p in CSRC.rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh") and "emulator" not in p.parts]
    newest = max((p.stat().st_mtime for p in sources), default=0.0)
    if newest > os.path.getmtime(spec.origin):
        return f"{spec.origin} is older than the sources in {CSRC} (rebuild: pip install --no-build-isolation -e .)"
    return None


def load_extension(verbose: bool = False) -> str | None:
    """Import or build the extension once; ``None`` when it is loaded, else why it is not."""
    if _EXT["tried"]:
        return _EXT["reason"]
    _EXT["tried"] = True
    start = time.perf_counter()
    how = None
    errors = []
    if _ops_registered():
        how = "preloaded"
    stale = _prebuilt_is_stale() if how is None else None
    if stale is not None:
        log.warning("mae_fast: not using the prebuilt extension: %s; JIT-building instead", stale)
        errors.append(stale)
    elif how is None:
        try:
            import mae_fast._C  # noqa: F401  (built by setup.py)

            how = "mae_fast._C"
        except Exception as e:  # ImportError, or an OSError from a build for another torch
            errors.append(f"import mae_fast._C: {e}")
    if how is None:
        if os.environ.get(NO_JIT_ENV, "") not in ("", "0"):
            errors.append(f"JIT build disabled by {NO_JIT_ENV}")
        else:
            try:
                how = _jit_build(verbose)
            except Exception as e:  # no compiler, no ninja, a compile error, ...
                errors.append(f"JIT build failed: {type(e).__name__}: {str(e).strip()[-2000:]}")
    if how is None or not _ops_registered():
        _EXT["reason"] = "the mae_fast attention extension is not available (" + "; ".join(errors) + ")"
        return _EXT["reason"]
    for hook in _AFTER_LOAD:
        hook()
    _EXT["how"] = how
    _EXT["cuda"] = torch._C._dispatch_has_kernel_for_dispatch_key("mae_fast::attention_fwd", "CUDA")
    _EXT["seconds"] = time.perf_counter() - start
    log.info("mae_fast: attention extension loaded (%s, CUDA kernels: %s) in %.1f s", how, _EXT["cuda"],
             _EXT["seconds"])
    return None


def extension_info() -> dict:
    """How the extension was loaded: ``{"reason", "cuda", "how", "seconds"}`` (loads it)."""
    load_extension()
    return {k: _EXT[k] for k in ("reason", "cuda", "how", "seconds")}


def extension_status() -> str:
    """One line for logs: how the extension was loaded (or why not) and whether it has CUDA kernels."""
    reason = load_extension()
    if reason is not None:
        return f"not available: {reason}"
    return f"loaded ({_EXT['how']}, {_EXT['seconds']:.1f} s), CUDA kernels: {_EXT['cuda']}"


# torch.compile calls this at trace time as a constant: it never traces the build.
@torch.compiler.assume_constant_result
def _extension_reason(device_type: str) -> str:
    reason = load_extension()
    if reason is not None:
        return reason
    if device_type == "cuda" and not _EXT["cuda"]:
        why = _cuda_build_reason() or "it was built by a setup.py run without CUDA"
        return f"the mae_fast extension was built without CUDA kernels ({why})"
    return ""


def why_not_extension(device: torch.device) -> str | None:
    """``None`` when the extension's ops can run on ``device``, else the reason they cannot."""
    if device.type not in ("cpu", "cuda"):
        return f"the extension runs on CPU and CUDA tensors, not {device.type}"
    return _extension_reason(device.type) or None
