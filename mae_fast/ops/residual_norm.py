"""The residual add fused with the LayerNorm that follows it: ``h = x + (y + bias)``, ``out =
LayerNorm(h)``, one pass that writes both the residual stream ``h`` and ``out``.

In a pre-norm transformer every residual add is followed by a LayerNorm: ``norm2`` inside a block,
the next block's ``norm1`` (or the final norm) across blocks. ``y`` is a Linear's output without
its bias (``bias`` is the Linear's bias, added here), so the add, the bias, the norm and, under
autocast, the cast of the norm's output for the next Linear take one read of ``x`` and ``y``
instead of four passes. :func:`layer_norm` is the same kernel without the add (the first norm1).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import Op, autocast_dtype
from ._checks import check_float, check_same_device, check_shape, check_tensor
from ._triton import HAS_TRITON, next_pow2, reduction_programs, rows_2d, tl, triton, triton_problem

_TILE_ELEMS = 4096  # values per program tile: ROWS rows of next_pow2(D)
_PROGRAMS_CAP = 1024  # backward programs at most (each loops over row tiles): partials stay small

# ============================================================================ reference

def add_layer_norm_reference(x, y, weight, norm_bias, eps: float, bias=None, out_dtype=None, branch_scale=None):
    """``h = x + (y + bias) * branch_scale`` (the bias in ``y``'s dtype, as a Linear adds its own;
    ``branch_scale (N,)`` one factor per sample, the leading dim), ``out = layer_norm(h)`` cast to
    ``out_dtype`` when given; returns ``(h, out)``."""
    t = y if bias is None else y + bias.to(y.dtype)
    if branch_scale is None:
        h = x + t
    else:
        h = (x + t * branch_scale.view(-1, *(1,) * (t.dim() - 1))).to(torch.promote_types(x.dtype, y.dtype))
    return h, layer_norm_reference(h, weight, norm_bias, eps, out_dtype)


def layer_norm_reference(x, weight, norm_bias, eps: float, out_dtype=None):
    """``F.layer_norm`` over the last dim, cast to ``out_dtype`` when given."""
    out = F.layer_norm(x, (x.shape[-1],), weight, norm_bias, eps)
    return out if out_dtype is None else out.to(out_dtype)


add_layer_norm_op = Op("add_layer_norm", add_layer_norm_reference)
layer_norm_op = Op("layer_norm", layer_norm_reference)


# ============================================================================ entry point

def add_layer_norm(x, y, weight, norm_bias, eps: float = 1e-6, *, bias=None, out_dtype=None, branch_scale=None,
                   backend=None):
    """``(h, out)``: ``h = x + (y + bias) * branch_scale`` of the promoted dtype of ``x`` and ``y``
    (``branch_scale (N,)``: one factor per sample of ``x (N, ..., D)``, e.g. stochastic depth's
    ``floor(keep + rand) / keep``, not differentiated; summed in fp32, one rounding), ``out`` its
    LayerNorm over the last dim (``weight``, ``norm_bias``: ``(D,)``), computed in fp32 and cast to
    ``out_dtype`` (default: what ``F.layer_norm`` returns). ``x``, ``y``: ``(..., D)``, the same
    shape. Under autocast pass the autocast dtype as ``out_dtype``: the next Linear would cast to
    it anyway, and the cast is then free. The triton backward is one pass per row block and
    deterministic (per-program partial sums of the weight and bias gradients, summed in a fixed
    order)."""
    _check_args(x, weight, norm_bias, eps, out_dtype, y=y, bias=bias)
    if branch_scale is not None:
        check_tensor(branch_scale, "branch_scale", 1)
        check_float(branch_scale, "branch_scale")
        check_same_device(x, "x", branch_scale=branch_scale)
        if x.dim() < 2:
            raise ValueError(f"x must have shape (N, ..., D) with branch_scale, got {tuple(x.shape)}")
        check_shape(branch_scale, "branch_scale", (x.shape[0],))
        branch_scale = branch_scale.detach()  # a random mask's factors: not differentiated
    return add_layer_norm_op(x, y, weight, norm_bias, float(eps), bias, out_dtype, branch_scale, backend=backend)


def layer_norm(x, weight, norm_bias, eps: float = 1e-6, *, out_dtype=None, backend=None):
    """``F.layer_norm(x, (D,), weight, norm_bias, eps)`` cast to ``out_dtype`` when given: the
    kernels of :func:`add_layer_norm` without the add."""
    _check_args(x, weight, norm_bias, eps, out_dtype)
    return layer_norm_op(x, weight, norm_bias, float(eps), out_dtype, backend=backend)


def _check_args(x, weight, norm_bias, eps, out_dtype, **extra) -> None:
    check_tensor(x, "x")
    check_float(x, "x")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got {tuple(x.shape)}")
    D = x.shape[-1]
    for name, t in (("weight", weight), ("norm_bias", norm_bias), *extra.items()):
        if t is None and name == "bias":
            continue
        check_tensor(t, name)
        check_float(t, name)
        check_same_device(x, "x", **{name: t})
        check_shape(t, name, tuple(x.shape) if name == "y" else (D,))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")


# ============================================================================ Triton kernels

if HAS_TRITON:

    @triton.jit
    def _add_ln_fwd_kernel(
        x_ptr, y_ptr, bias_ptr, scale_ptr, w_ptr, nb_ptr, h_ptr, out_ptr, mean_ptr, rstd_ptr,
        R, D, T, s_x, s_y, eps,
        HAS_Y: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """``h = x + (y + bias) * scale[row // T]`` rounded once to h's dtype (``y + bias`` first
        rounded to y's dtype, as a Linear's output), ``out = (h - mean) * rstd * w + nb``.

        ``x``, ``y``: ``(R, D)``, row strides ``s_x``, ``s_y``, column stride 1; ``h``, ``out``:
        ``(R, D)`` contiguous (``h`` unused without HAS_Y: the norm reads ``x``); ``mean``,
        ``rstd``: ``(R,)`` fp32 for the backward. Statistics in fp32 from h as stored (two passes
        over the tile in registers, biased variance, as ``F.layer_norm``). ``ROWS`` rows per
        program, grid ``(cdiv(R, ROWS),)``. Bytes: read x, y; write h, out; 8 per row.
        """
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < R
        cmask = cols < D
        m = rmask[:, None] & cmask[None, :]
        h = tl.load(x_ptr + (rows * s_x)[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_Y:
            t = tl.load(y_ptr + (rows * s_y)[:, None] + cols[None, :], mask=m, other=0.0)
            if HAS_BIAS:
                b = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(t.dtype)
                t = (t.to(tl.float32) + b.to(tl.float32)[None, :]).to(y_ptr.dtype.element_ty)
            t = t.to(tl.float32)
            if HAS_SCALE:  # one factor per sample: T rows each
                t *= tl.load(scale_ptr + rows // T, mask=rmask, other=0.0).to(tl.float32)[:, None]
            h = (h + t).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + (rows * D)[:, None] + cols[None, :], h, mask=m)
            h = h.to(tl.float32)
        mean = tl.sum(h, axis=1) / D
        diff = tl.where(m, h - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(diff * diff, axis=1) / D + eps)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        nb = tl.load(nb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        out = diff * rstd[:, None] * w[None, :] + nb[None, :]
        tl.store(out_ptr + (rows * D)[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(mean_ptr + rows, mean, mask=rmask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)

    @triton.jit
    def _add_ln_bwd_kernel(
        dout_ptr, dh_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, scale_ptr, dx_ptr, dy_ptr, part_ptr,
        R, D, T, s_do, s_dh, s_h, tiles_per_prog,
        HAS_DH: tl.constexpr, HAS_SCALE: tl.constexpr, WRITE_DY: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """The gradient of the residual stream, ``g = dh + LayerNorm'(h) dout``, written as ``dx``
        (x's dtype) and, if WRITE_DY, ``dy = g * scale[row // T]`` (y's dtype); per-program partial
        sums ``part[pid] = (sum dout * xhat, sum dout, sum dy)`` of the weight, norm-bias and bias
        gradients, fp32 ``(programs, 3, D)``, summed afterwards in a fixed order (no atomics).

        ``dout``, ``dh``, ``h``: ``(R, D)`` with row strides, column stride 1; ``dx``, ``dy``
        contiguous. Program ``pid`` takes the row tiles ``pid, pid + programs, ...``
        (``tiles_per_prog`` of them), grid ``(programs,)``. Bytes: read dout, dh, h; write dx
        (and dy); 8 per row; the partials.
        """
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_nb = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(0, tiles_per_prog):
            rows = (pid + i * n_prog).to(tl.int64) * ROWS + tl.arange(0, ROWS)
            rmask = rows < R
            m = rmask[:, None] & cmask[None, :]
            mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
            h = tl.load(h_ptr + (rows * s_h)[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
            xhat = tl.where(m, (h - mean[:, None]) * rstd[:, None], 0.0)
            go = tl.load(dout_ptr + (rows * s_do)[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
            wg = go * w[None, :]
            c1 = tl.sum(xhat * wg, axis=1) / D
            c2 = tl.sum(wg, axis=1) / D
            g = (wg - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DH:
                g += tl.load(dh_ptr + (rows * s_dh)[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
            g = tl.where(m, g, 0.0)
            out_off = (rows * D)[:, None] + cols[None, :]
            tl.store(dx_ptr + out_off, g.to(dx_ptr.dtype.element_ty), mask=m)
            if HAS_SCALE:
                gy = (g * tl.load(scale_ptr + rows // T, mask=rmask, other=0.0).to(tl.float32)[:, None])
                gy = gy.to(dy_ptr.dtype.element_ty)
            else:
                gy = g.to(dy_ptr.dtype.element_ty)
            if WRITE_DY:
                tl.store(dy_ptr + out_off, gy, mask=m)
            acc_w += tl.sum(go * xhat, axis=0)
            acc_nb += tl.sum(go, axis=0)
            acc_b += tl.sum(gy.to(tl.float32), axis=0)
        base = part_ptr + pid.to(tl.int64) * 3 * D + cols
        tl.store(base, acc_w, mask=cmask)
        tl.store(base + D, acc_nb, mask=cmask)
        tl.store(base + 2 * D, acc_b, mask=cmask)


# ============================================================================ host launchers

def _tile(D: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_D, num_warps): about ``_TILE_ELEMS`` values per program, 16 per thread."""
    block = next_pow2(D)
    rows = max(1, _TILE_ELEMS // block)
    return rows, block, 8 if rows * block >= 4096 else 4


def _launch_fwd(x, y, bias, weight, norm_bias, eps, h_dtype, out_dtype, scale=None):
    """``(h or None, out, mean, rstd)`` of ``x``'s shape (mean, rstd: ``(R,)`` fp32)."""
    D = x.shape[-1]
    x2 = rows_2d(x)
    y2 = rows_2d(y) if y is not None else x2
    weight, norm_bias = weight.contiguous(), norm_bias.contiguous()  # (D,): the kernel reads them densely
    bias = bias.contiguous() if bias is not None else None
    R = x2.shape[0]
    h = torch.empty(x.shape, dtype=h_dtype, device=x.device) if y is not None else None
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty((R,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((R,), dtype=torch.float32, device=x.device)
    if R:
        ROWS, BLOCK_D, warps = _tile(D)
        _add_ln_fwd_kernel[(triton.cdiv(R, ROWS),)](
            x2, y2, bias if bias is not None else weight, scale if scale is not None else weight, weight, norm_bias,
            h if h is not None else out, out, mean, rstd, R, D, _rows_per_sample(x, scale), x2.stride(0),
            y2.stride(0), eps, HAS_Y=y is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
            ROWS=ROWS, BLOCK_D=BLOCK_D, num_warps=warps,
        )
    return h, out, mean, rstd


def _rows_per_sample(x, scale) -> int:
    return (x.numel() // x.shape[-1]) // x.shape[0] if scale is not None and x.shape[0] else 1


def _writes_dy(x_dtype, y_dtype, scale) -> bool:
    return y_dtype is not None and (y_dtype != x_dtype or scale is not None)


def _launch_bwd(dout, dh, h, weight, mean, rstd, x_dtype, y_dtype, scale=None):
    """``(dx, dy or None, partial sums (programs, 3, D) fp32)``; ``dy`` only when it differs from
    ``dx`` (another dtype, or a branch scale)."""
    D = h.shape[-1]
    do2, h2 = rows_2d(dout), rows_2d(h)
    weight = weight.contiguous()
    dh2 = rows_2d(dh) if dh is not None else do2
    R = h2.shape[0]
    ROWS, BLOCK_D, warps = _tile(D)
    n_tiles = triton.cdiv(R, ROWS)
    programs = reduction_programs(n_tiles, _PROGRAMS_CAP)
    write_dy = _writes_dy(x_dtype, y_dtype, scale)
    dx = torch.empty(h.shape, dtype=x_dtype, device=h.device)
    dy = torch.empty(h.shape, dtype=y_dtype, device=h.device) if write_dy else None
    part = torch.empty((programs, 3, D), dtype=torch.float32, device=h.device)
    _add_ln_bwd_kernel[(programs,)](
        do2, dh2, h2, weight, mean, rstd, scale if scale is not None else weight, dx, dy if write_dy else dx, part,
        R, D, _rows_per_sample(h, scale), do2.stride(0), dh2.stride(0), h2.stride(0), triton.cdiv(n_tiles, programs),
        HAS_DH=dh is not None, HAS_SCALE=scale is not None, WRITE_DY=write_dy, ROWS=ROWS, BLOCK_D=BLOCK_D,
        num_warps=warps,
    )
    return dx, dy, part


# ============================================================================ custom ops + autograd

@torch.library.custom_op("mae_fast::add_layer_norm", mutates_args=())
def _add_ln_cop(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, norm_bias: torch.Tensor,
                bias: Optional[torch.Tensor], eps: float, out_dtype: torch.dtype, scale: Optional[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, out, mean, rstd)``."""
    return _launch_fwd(x, y, bias, weight, norm_bias, eps, torch.promote_types(x.dtype, y.dtype), out_dtype, scale)


@_add_ln_cop.register_fake
def _(x, y, weight, norm_bias, bias, eps, out_dtype, scale):
    R = x.numel() // x.shape[-1]
    stats = x.new_empty((R,), dtype=torch.float32)
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, y.dtype)), x.new_empty(x.shape, dtype=out_dtype),
            stats, torch.empty_like(stats))


@torch.library.custom_op("mae_fast::layer_norm", mutates_args=())
def _ln_cop(x: torch.Tensor, weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
            out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, mean, rstd)``."""
    return _launch_fwd(x, None, None, weight, norm_bias, eps, x.dtype, out_dtype)[1:]


@_ln_cop.register_fake
def _(x, weight, norm_bias, eps, out_dtype):
    stats = x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("mae_fast::add_layer_norm_backward", mutates_args=())
def _add_ln_bwd_cop(dout: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor, weight: torch.Tensor,
                    mean: torch.Tensor, rstd: torch.Tensor, x_dtype: torch.dtype, y_dtype: Optional[torch.dtype],
                    scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dy, partial sums)``; ``dy`` is empty when it would equal ``dx``."""
    dx, dy, part = _launch_bwd(dout, dh, h, weight, mean, rstd, x_dtype, y_dtype, scale)
    return dx, dy if dy is not None else dx.new_empty((0,)), part


@_add_ln_bwd_cop.register_fake
def _(dout, dh, h, weight, mean, rstd, x_dtype, y_dtype, scale):
    D = h.shape[-1]
    programs = reduction_programs(triton.cdiv(h.numel() // D, _tile(D)[0]), _PROGRAMS_CAP)
    write_dy = _writes_dy(x_dtype, y_dtype, scale)
    return (h.new_empty(h.shape, dtype=x_dtype), h.new_empty(h.shape if write_dy else (0,), dtype=y_dtype or x_dtype),
            h.new_empty((programs, 3, D), dtype=torch.float32))


def _param_grads(ctx, part, offset: int):
    """The gradients of (weight, norm_bias[, bias]) from the partial sums, in their dtypes."""
    sums = part.sum(dim=0)  # a fixed-order reduction over programs
    return [sums[i].to(dt) if ctx.needs_input_grad[offset + i] else None for i, dt in enumerate(ctx.param_dtypes)]


def _add_ln_setup(ctx, inputs, output):
    x, y, weight, norm_bias, bias, eps, out_dtype, scale = inputs
    h, _, mean, rstd = output
    ctx.save_for_backward(h, weight, mean, rstd, scale)
    ctx.dtypes = (x.dtype, y.dtype)
    ctx.param_dtypes = (weight.dtype, norm_bias.dtype) + ((bias.dtype,) if bias is not None else ())
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused h (the last residual stream) costs no read of zeros


def _add_ln_backward(ctx, dh, dout, _dmean, _drstd):
    h, weight, mean, rstd, scale = ctx.saved_tensors
    x_dt, y_dt = ctx.dtypes
    if dout is None:
        dout = torch.zeros_like(h)
    dx, dy, part = _add_ln_bwd_cop(dout, dh, h, weight, mean, rstd, x_dt, y_dt, scale)
    if not _writes_dy(x_dt, y_dt, scale):  # one gradient for both, as autograd's own add passes it
        dy = dx
    dw, dnb, *db = _param_grads(ctx, part, 2)
    return dx, dy, dw, dnb, (db[0] if db else None), None, None, None


_add_ln_cop.register_autograd(_add_ln_backward, setup_context=_add_ln_setup)


def _ln_setup(ctx, inputs, output):
    x, weight, norm_bias, eps, out_dtype = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.x_dtype = x.dtype
    ctx.param_dtypes = (weight.dtype, norm_bias.dtype)
    ctx.mark_non_differentiable(mean, rstd)


def _ln_backward(ctx, dout, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, _, part = _add_ln_bwd_cop(dout, None, x, weight, mean, rstd, ctx.x_dtype, None, None)
    dw, dnb = _param_grads(ctx, part, 1)
    return dx, dw, dnb, None, None


_ln_cop.register_autograd(_ln_backward, setup_context=_ln_setup)


# ============================================================================ registration

def _ln_dtype(device, in_dtype, out_dtype):
    """What F.layer_norm returns, unless the caller casts: its input's dtype (fp32 parameters
    with half inputs are allowed), fp32 under CUDA autocast (which runs it in fp32)."""
    if out_dtype is not None:
        return out_dtype
    if device.type == "cuda" and autocast_dtype(device) is not None:
        return torch.float32
    return in_dtype


def _add_layer_norm_triton(x, y, weight, norm_bias, eps, bias=None, out_dtype=None, branch_scale=None):
    dt = _ln_dtype(x.device, torch.promote_types(x.dtype, y.dtype), out_dtype)
    h, out, _, _ = _add_ln_cop(x, y, weight, norm_bias, bias, eps, dt, branch_scale)
    return h, out


def _layer_norm_triton(x, weight, norm_bias, eps, out_dtype=None):
    return _ln_cop(x, weight, norm_bias, eps, _ln_dtype(x.device, x.dtype, out_dtype))[0]


def _add_ln_problem(x, y, weight, norm_bias, eps, bias=None, out_dtype=None, branch_scale=None):
    extra = {k: t for k, t in (("bias", bias), ("branch_scale", branch_scale)) if t is not None}
    return triton_problem(x=x, y=y, weight=weight, norm_bias=norm_bias, **extra) or _out_problem(out_dtype)


def _ln_problem(x, weight, norm_bias, eps, out_dtype=None):
    return triton_problem(x=x, weight=weight, norm_bias=norm_bias) or _out_problem(out_dtype)


def _out_problem(out_dtype):
    if out_dtype is not None and out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return TypeError, f"out_dtype must be float32, float16 or bfloat16 for the triton backend, got {out_dtype}"
    return None


add_layer_norm_op.register("triton", _add_layer_norm_triton, _add_ln_problem)
layer_norm_op.register("triton", _layer_norm_triton, _ln_problem)
