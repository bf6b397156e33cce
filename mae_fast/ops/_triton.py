"""Shared helpers of the Triton ops: is Triton usable here, launch parameters, input checks.

Triton is optional: without it this module still imports, ``HAS_TRITON`` is False and
:func:`why_not_triton` says why. On CPU tensors Triton runs only under its interpreter
(``TRITON_INTERPRET=1``), which must be set before triton is first imported, because ``@triton.jit``
decides at decoration time whether a kernel is compiled or interpreted.
"""
from __future__ import annotations

import os

import torch

from ._backend import autocast_dtype  # noqa: F401  (re-exported for the op files)

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    HAS_TRITON = True
    _IMPORT_ERROR = ""
except Exception as e:  # ImportError, or a broken install
    triton = None
    tl = None
    HAS_TRITON = False
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

# Whether the kernels of this package were decorated as interpreted functions: read once, at
# import time, exactly as triton itself does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

CHECK_IDS_ENV = "MAE_FAST_CHECK_IDS"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def why_not_triton(device: torch.device) -> str | None:
    """``None`` when the Triton kernels can run on ``device``, else the reason they cannot."""
    if not HAS_TRITON:
        return f"triton is not importable ({_IMPORT_ERROR}); pip install triton"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    if device.type == "cpu":
        if INTERPRET:
            return None
        return ("Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported")
    return f"Triton kernels here support CUDA (and CPU under TRITON_INTERPRET=1), not {device.type}"


def check_ids_enabled() -> bool:
    """The debug mode: ``MAE_FAST_CHECK_IDS=1`` range-checks index tensors on the host. Never while
    torch.compile traces (the check needs the values)."""
    if torch.compiler.is_compiling():
        return False
    return os.environ.get(CHECK_IDS_ENV, "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def row_block(n: int, cap: int = 2048) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that spreads a row of ``n`` elements over one program."""
    block = min(next_pow2(max(n, 16)), cap)
    warps = 4 if block <= 1024 else 8
    return block, warps


def rows_block(n: int, cap: int = 1024, elems: int = 4096) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps) for a copy-like kernel moving ``ROWS`` rows of ``BLOCK`` columns
    (of a row of ``n``) per program: about ``elems`` elements per program (16 per thread with 8
    warps), so that each program keeps several KiB in flight. Checked with ptxas for sm_90a: no
    spills, 64-93 registers."""
    block = min(next_pow2(max(n, 16)), cap)
    rows = max(1, elems // block)
    return rows, block, 8


# ---------------------------------------------------------------- input checks (clear errors)

def check_tensor(t, name: str, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_float(t: torch.Tensor, name: str) -> None:
    """Any floating dtype (the torch reference also runs in float64)."""
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def triton_dtype_problem(**tensors: torch.Tensor) -> str | None:
    """Why the Triton kernels do not take these tensors' dtypes (float32, float16 and bfloat16
    only), or None."""
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            return (f"{name} must be float32, float16 or bfloat16 for the triton backend, got {t.dtype} "
                    f"(backend='torch' runs any floating dtype)")
    return None


def check_triton_dtypes(**tensors: torch.Tensor) -> None:
    problem = triton_dtype_problem(**tensors)
    if problem is not None:
        raise TypeError(problem)


def check_ids(t: torch.Tensor, name: str) -> None:
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 (torch.long), got {t.dtype}")


def check_same_device(ref: torch.Tensor, ref_name: str, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def check_shape(t: torch.Tensor, name: str, expected: tuple) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def host_check_ids(ids: torch.Tensor, name: str, upper: int, unique: bool) -> None:
    """Debug check (``MAE_FAST_CHECK_IDS=1``): every id in ``[0, upper)`` and, if ``unique``, no
    id twice in a row. Costs a device->host sync and a sort of ``ids``."""
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must hold ids in [0, {upper}), found values in [{lo}, {hi}]")
    if unique and ids.shape[-1] > 1:
        s = ids.sort(dim=-1).values
        if bool((s[..., 1:] == s[..., :-1]).any()):
            raise ValueError(f"{name} must not repeat an id within a row")



def compile_for_cuda(kernel, signature: dict, constexprs: dict, arch: int = 90, num_warps: int = 4,
                     aligned: tuple = ()):
    """Compile ``kernel`` (a ``@triton.jit`` function) to a cubin for ``sm_<arch>`` without a GPU
    (Triton's own ptxas): a check, on CPU machines, that the compiled path accepts what the
    interpreter accepted. Needs a process where ``TRITON_INTERPRET`` was NOT set at import.
    ``signature`` maps pointer / non-default argument names to Triton types (``"*bf16"``,
    ``"i64"``); other arguments are ``i32``. ``aligned`` names the arguments (those the kernel has) to mark divisible by
    16, as Triton's launcher does at run time for 16-byte-aligned pointers and multiples of 16
    (what lets it vectorise). Returns the compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRET:
        raise RuntimeError("compile_for_cuda needs a process started without TRITON_INTERPRET=1")
    names = kernel.arg_names
    sig = {n: ("constexpr" if n in constexprs else signature.get(n, "i32")) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned if n in names}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
