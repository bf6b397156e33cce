"""The MLP's activation with the fc1 bias: ``gelu(x + bias)``, the exact (erf) GELU of
``nn.GELU()``.

``x`` is fc1's output without its bias. The forward reads and writes the activations once, as a
plain GELU does; the backward computes the GELU gradient and the bias gradient in one pass (the
reference reads the gradient once more to sum it for the bias).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import Op
from ._checks import check_float, check_same_device, check_shape, check_tensor
from ._triton import HAS_TRITON, next_pow2, reduction_programs, rows_2d, tl, triton, triton_problem

_BLOCK_F = 1024  # columns per program: one bias slice
_TILE_ELEMS = 4096
_PROGRAMS_CAP = 256  # backward row programs at most (times F / BLOCK_F column blocks)

# ============================================================================ reference

def bias_gelu_reference(x, bias):
    """``gelu(x + bias)`` with the bias in ``x``'s dtype (as a Linear adds its own)."""
    return F.gelu(x + bias.to(x.dtype))


bias_gelu_op = Op("bias_gelu", bias_gelu_reference)


# ============================================================================ entry point

def bias_gelu(x, bias, *, backend=None):
    """``gelu(x + bias)``, exact erf GELU, in ``x``'s dtype: ``x (..., F)``, ``bias (F,)``. The
    triton backward is deterministic (per-program partial sums of the bias gradient, summed in a
    fixed order)."""
    check_tensor(x, "x")
    check_tensor(bias, "bias", 1)
    check_float(x, "x")
    check_float(bias, "bias")
    check_same_device(x, "x", bias=bias)
    if x.dim() < 1:
        raise ValueError(f"x must have shape (..., F), got {tuple(x.shape)}")
    check_shape(bias, "bias", (x.shape[-1],))
    return bias_gelu_op(x, bias, backend=backend)


# ============================================================================ Triton kernels

if HAS_TRITON:

    @triton.jit
    def _gelu_parts(x_ptr, b_ptr, rows, cols, s_x, R, F_):
        """The pre-activation ``t = x + bias`` (rounded to x's dtype, then fp32), its mask and
        offsets into a contiguous ``(R, F)`` output."""
        m = (rows < R)[:, None] & (cols < F_)[None, :]
        x = tl.load(x_ptr + (rows * s_x)[:, None] + cols[None, :], mask=m, other=0.0)
        b = tl.load(b_ptr + cols, mask=cols < F_, other=0.0).to(x.dtype)
        t = (x.to(tl.float32) + b.to(tl.float32)[None, :]).to(x.dtype).to(tl.float32)
        return t, m, (rows * F_)[:, None] + cols[None, :]

    @triton.jit
    def _bias_gelu_fwd_kernel(x_ptr, b_ptr, out_ptr, R, F_, s_x, ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
        """``out = 0.5 t (1 + erf(t / sqrt 2))`` in fp32, one rounding. ``x (R, F)`` row stride
        ``s_x``, column stride 1; ``out`` contiguous. Grid ``(cdiv(R, ROWS), cdiv(F, BLOCK_F))``.
        Bytes: read x, write out."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        t, m, off = _gelu_parts(x_ptr, b_ptr, rows, cols, s_x, R, F_)
        out = 0.5 * t * (1.0 + tl.erf(t * 0.7071067811865476))
        tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _bias_gelu_bwd_kernel(g_ptr, x_ptr, b_ptr, dx_ptr, part_ptr, R, F_, s_g, s_x, tiles_per_prog,
                              ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
        """``dx = g * gelu'(t)``, ``gelu'(t) = Phi(t) + t phi(t)``, rounded to x's dtype; and
        ``part[pid, cols] = sum dx`` (as rounded) over this program's rows, fp32, summed afterwards
        in a fixed order. Program ``(pid, j)`` takes the row tiles ``pid, pid + programs, ...`` of
        column block ``j``; grid ``(programs, cdiv(F, BLOCK_F))``. Bytes: read g, x; write dx; the
        partials."""
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        acc = tl.zeros([BLOCK_F], dtype=tl.float32)
        for i in range(0, tiles_per_prog):
            rows = (pid + i * n_prog).to(tl.int64) * ROWS + tl.arange(0, ROWS)
            t, m, off = _gelu_parts(x_ptr, b_ptr, rows, cols, s_x, R, F_)
            g = tl.load(g_ptr + (rows * s_g)[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
            cdf = 0.5 * (1.0 + tl.erf(t * 0.7071067811865476))
            pdf = tl.exp(-0.5 * t * t) * 0.3989422804014327
            dx = (g * (cdf + t * pdf)).to(dx_ptr.dtype.element_ty)
            tl.store(dx_ptr + off, dx, mask=m)
            acc += tl.sum(tl.where(m, dx.to(tl.float32), 0.0), axis=0)
        tl.store(part_ptr + pid.to(tl.int64) * F_ + cols, acc, mask=cols < F_)


# ============================================================================ host launchers

def _tile(F_: int) -> tuple[int, int]:
    """(ROWS, BLOCK_F): a ``[ROWS, BLOCK_F]`` tile of about ``_TILE_ELEMS`` values."""
    block = min(next_pow2(F_), _BLOCK_F)
    return max(1, _TILE_ELEMS // block), block


def _launch_fwd(x, bias):
    x2, bias = rows_2d(x), bias.contiguous()
    R, F_ = x2.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        ROWS, BLOCK_F = _tile(F_)
        _bias_gelu_fwd_kernel[(triton.cdiv(R, ROWS), triton.cdiv(F_, BLOCK_F))](
            x2, bias, out, R, F_, x2.stride(0), ROWS=ROWS, BLOCK_F=BLOCK_F, num_warps=8)
    return out


def _programs(R: int, F_: int) -> int:
    ROWS, _ = _tile(F_)
    return reduction_programs(triton.cdiv(R, ROWS), _PROGRAMS_CAP)


def _launch_bwd(grad, x, bias):
    """``(dx, partial sums of the bias gradient (programs, F) fp32)``."""
    g2, x2, bias = rows_2d(grad), rows_2d(x), bias.contiguous()
    R, F_ = x2.shape
    ROWS, BLOCK_F = _tile(F_)
    programs = _programs(R, F_)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    part = torch.empty((programs, F_), dtype=torch.float32, device=x.device)
    if F_:
        n_tiles = triton.cdiv(R, ROWS)
        _bias_gelu_bwd_kernel[(programs, triton.cdiv(F_, BLOCK_F))](
            g2, x2, bias, dx, part, R, F_, g2.stride(0), x2.stride(0), triton.cdiv(n_tiles, programs),
            ROWS=ROWS, BLOCK_F=BLOCK_F, num_warps=8)
    return dx, part


# ============================================================================ custom op + autograd

@torch.library.custom_op("mae_fast::bias_gelu", mutates_args=())
def _bias_gelu_cop(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _launch_fwd(x, bias)


@_bias_gelu_cop.register_fake
def _(x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("mae_fast::bias_gelu_backward", mutates_args=())
def _bias_gelu_bwd_cop(grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_bwd(grad, x, bias)


@_bias_gelu_bwd_cop.register_fake
def _(grad, x, bias):
    F_ = x.shape[-1]
    programs = _programs(x.numel() // max(F_, 1), F_)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((programs, F_), dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    dx, part = _bias_gelu_bwd_cop(grad, x, bias)
    dbias = part.sum(dim=0).to(bias.dtype) if ctx.needs_input_grad[1] else None  # fixed-order reduction
    return (dx if ctx.needs_input_grad[0] else None), dbias


_bias_gelu_cop.register_autograd(_backward, setup_context=_setup)


# ============================================================================ registration

def _triton_problem(x, bias):
    return triton_problem(x=x, bias=bias)


bias_gelu_op.register("triton", _bias_gelu_cop, _triton_problem)
