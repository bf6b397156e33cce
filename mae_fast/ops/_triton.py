"""Shared helpers of the Triton ops: is Triton usable here, what its kernels take, launch parameters.

Triton is optional: without it this module still imports, ``HAS_TRITON`` is False and
:func:`why_not_triton` says why. On CPU tensors Triton runs only under its interpreter
(``TRITON_INTERPRET=1``), which must be set before triton is first imported, because ``@triton.jit``
decides at decoration time whether a kernel is compiled or interpreted.
"""
from __future__ import annotations

import os

import torch

from ._backend import Problem, unavailable

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


def triton_problem(**tensors: torch.Tensor) -> Problem:
    """What the Triton kernels cannot take of these tensors: their device (the first one's), or a
    dtype other than float32, float16 and bfloat16. None when they take them."""
    first = next(iter(tensors.values()))
    reason = why_not_triton(first.device)
    if reason is not None:
        return unavailable(reason)
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            return TypeError, (f"{name} must be float32, float16 or bfloat16 for the triton backend, got {t.dtype} "
                               f"(backend='torch' runs any floating dtype)")
    return None


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """``(..., D)`` -> ``(R, D)`` with column stride 1, as the row kernels read it (a view when
    the layout allows, else a copy)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(1) == 1 or t2.shape[1] == 1 else t2.contiguous()


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


def reduction_programs(n_tiles: int, cap: int = 1024) -> int:
    """Programs for a kernel that reduces over ``n_tiles`` row tiles into per-program partial
    sums: enough to fill a GPU (a few per SM), few enough that the partials stay small. A function
    of the shape only, so the fixed-order sum of the partials gives the same bits on every run."""
    return max(1, min(n_tiles, cap))


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
