"""Multi-head self-attention on the packed output of a qkv Linear.

``qkv`` is the ``(B, N, 3*H*D)`` output of the qkv Linear viewed as ``(B, N, 3, H, D)``, with no
permute and no copy; the result is ``(B, N, H*D)``, ready for the proj Linear. Scale ``D**-0.5``,
no mask, no dropout.

Backends: ``torch`` is the timm computation (permute + SDPA). ``cuda`` is the C++/CUDA extension
(``csrc/``), exposed as the custom ops ``torch.ops.mae_fast.attention_fwd`` (-> out, lse) and
``attention_bwd`` (-> dqkv in the packed layout), with autograd and fake (meta) kernels so that
``torch.compile(fullgraph=True)`` traces it. The extension runs on CUDA tensors (fp16/bf16, head
dims 32/64/80/128) and, through its C++ CPU twin, on CPU tensors (fp32/fp16/bf16, any head dim),
which is how it is tested without a GPU; ``auto`` uses it on CUDA only.

The extension is loaded lazily on first use: ``import mae_fast._C`` when the package was built
with ``setup.py``, else a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load`` (with the
CUDA kernels when torch has CUDA and nvcc is found; minutes on first use, cached afterwards).
``MAE_FAST_NO_JIT=1`` disables the JIT build.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .._build import nvcc_gencode
from ._backend import Op, autocast_dtype

log = logging.getLogger("mae_fast")

NO_JIT_ENV = "MAE_FAST_NO_JIT"
CUDA_HEAD_DIMS = (32, 64, 80, 128)
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CSRC = Path(__file__).resolve().parents[2] / "csrc"


def attention_reference(qkv: torch.Tensor) -> torch.Tensor:
    """The timm ``Attention`` computation, with SDPA for the core."""
    B, N, _, H, D = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, N, H * D)


attention_op = Op("attention", attention_reference)


def check_qkv(qkv: torch.Tensor) -> None:
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (B, N, 3, H, D), got {tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise TypeError(f"qkv must be a floating-point tensor, got {qkv.dtype}")


# --------------------------------------------------------------------------------------------
# Loading the extension (once per process).

# Plain module globals (read, never written, while torch.compile traces).
_EXT: dict = {"tried": False, "reason": None, "cuda": False, "how": None, "seconds": 0.0}


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
    _register_python_parts()
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


def _why_not_extension(device: torch.device) -> str | None:
    if device.type not in ("cpu", "cuda"):
        return f"the extension runs on CPU and CUDA tensors, not {device.type}"
    return _extension_reason(device.type) or None


# --------------------------------------------------------------------------------------------
# The custom op's Python parts: fake kernels, autograd, autocast.

_REGISTERED = [False]


def _register_python_parts() -> None:
    if _REGISTERED[0]:
        return
    _REGISTERED[0] = True

    @torch.library.register_fake("mae_fast::attention_fwd")
    def _fwd_fake(qkv):
        torch._check(qkv.dim() == 5 and qkv.shape[2] == 3, lambda: "qkv must have shape (B, N, 3, H, D)")
        B, N, _, H, D = qkv.shape
        return qkv.new_empty((B, N, H * D)), qkv.new_empty((B, H, N), dtype=torch.float32)

    @torch.library.register_fake("mae_fast::attention_bwd")
    def _bwd_fake(dout, qkv, out, lse):
        return qkv.new_empty(qkv.shape)  # contiguous, like the kernels' dqkv

    def setup_context(ctx, inputs, output):
        (qkv,) = inputs
        out, lse = output
        ctx.save_for_backward(qkv, out, lse)

    def backward(ctx, dout, dlse):
        # lse is an auxiliary output for the backward; its gradient (if any) is ignored.
        qkv, out, lse = ctx.saved_tensors
        if dout is None:
            return torch.zeros_like(qkv)
        return torch.ops.mae_fast.attention_bwd(dout, qkv, out, lse)

    torch.library.register_autograd("mae_fast::attention_fwd", backward, setup_context=setup_context)


def extension_input_problem(qkv: torch.Tensor) -> tuple[type, str] | None:
    """``(exception type, message)`` for an input the extension does not take, else None. The dtype
    is the one the op runs in: the autocast dtype where autocast is on."""
    on_cuda = qkv.device.type == "cuda"
    dtype = autocast_dtype(qkv.device) or qkv.dtype
    if on_cuda and dtype not in CUDA_DTYPES:
        return TypeError, f"qkv must be float16 or bfloat16 on CUDA, got {dtype}"
    if not on_cuda and dtype not in (*CUDA_DTYPES, torch.float32):
        return TypeError, f"qkv must be float16, bfloat16 or float32 on CPU, got {dtype}"
    if on_cuda and qkv.shape[-1] not in CUDA_HEAD_DIMS:
        return ValueError, f"qkv head dim (size 4) must be one of {CUDA_HEAD_DIMS} on CUDA, got {qkv.shape[-1]}"
    if qkv.stride(-1) != 1 and qkv.shape[-1] != 1:
        return ValueError, (f"qkv must have innermost (head-dim) stride 1, got strides {qkv.stride()}; "
                            f"pass qkv.contiguous() or a view of the qkv Linear's output")
    return None


def _declines(qkv: torch.Tensor) -> str | None:
    """For ``auto``: an input the kernels do not take (fp32 without autocast, an odd head dim)
    goes to the reference instead of failing."""
    problem = extension_input_problem(qkv)
    return None if problem is None else problem[1]


def attention_extension(qkv: torch.Tensor) -> torch.Tensor:
    """The op through the extension (``backend="cuda"``). Under autocast it runs in the autocast
    dtype, like SDPA would. Bad input is raised here, in Python: on the H200 machine (torch 2.11,
    cu130) some errors thrown inside the extension crashed the process instead of raising."""
    problem = extension_input_problem(qkv)
    if problem is not None:
        raise problem[0](problem[1])
    dtype = autocast_dtype(qkv.device)
    if dtype is not None and qkv.dtype != dtype:
        qkv = qkv.to(dtype)
    out, _ = torch.ops.mae_fast.attention_fwd(qkv)
    return out


attention_op.register("cuda", attention_extension, _why_not_extension, _declines)


def attention(qkv: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    check_qkv(qkv)
    return attention_op(qkv, backend=backend, device=qkv.device)


# ``from mae_fast.ops import attention`` yields the function above (the package re-exports it), so
# the status helpers are reachable from it as well as from this module.
attention.extension_status = extension_status
attention.extension_info = extension_info
