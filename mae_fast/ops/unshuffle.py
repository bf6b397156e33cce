"""The decoder's input: un-shuffle the encoded tokens, with mask tokens at removed positions."""
from __future__ import annotations

import torch

from ._backend import Op
from ._checks import check_float, check_ids, check_same_device, check_shape, check_tensor, debug_check_ids
from ._triton import HAS_TRITON, row_block, rows_block, tl, triton, triton_problem

# ============================================================================ reference

def unshuffle_mask_tokens_reference(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """``(N, 1+K, d)`` -> ``(N, 1+L, d)``, the authors' order: append ``L - K`` mask tokens after
    the patch tokens, reorder with ``ids_restore``, put cls back in front, add ``pos_embed``."""
    N, _, d = x.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.repeat(N, L + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, d))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + pos_embed


unshuffle_mask_tokens_op = Op("unshuffle_mask_tokens", unshuffle_mask_tokens_reference)


# ============================================================================ entry point

def unshuffle_mask_tokens(x, ids_restore, mask_token, pos_embed, *, backend=None):
    """The decoder input ``(N, 1+L, d)``: ``x (N, 1+K, d)`` (cls row then the K kept tokens, in
    ``ids_keep`` order), ``ids_restore (N, L)`` int64 (a permutation of ``0..L-1`` per row: values
    ``< K`` pick ``x[:, 1 + value]``, the others ``mask_token (1, 1, d)``), plus
    ``pos_embed (1, 1+L, d)``. With ``MAE_FAST_CHECK_IDS=1`` ``ids_restore`` is checked to be a
    permutation on the host (a device sync and a sort)."""
    _check_args(x, ids_restore, mask_token, pos_embed)
    debug_check_ids(ids_restore, "ids_restore", ids_restore.shape[1])
    return unshuffle_mask_tokens_op(x, ids_restore, mask_token, pos_embed, backend=backend)


def _check_args(x, ids_restore, mask_token, pos_embed) -> None:
    check_tensor(x, "x", 3)
    check_tensor(ids_restore, "ids_restore", 2)
    check_tensor(mask_token, "mask_token", 3)
    check_tensor(pos_embed, "pos_embed", 3)
    check_float(x, "x")
    check_float(mask_token, "mask_token")
    check_float(pos_embed, "pos_embed")
    check_ids(ids_restore, "ids_restore")
    check_same_device(x, "x", ids_restore=ids_restore, mask_token=mask_token, pos_embed=pos_embed)
    N, K1, d = x.shape
    L = ids_restore.shape[1]
    if ids_restore.shape[0] != N:
        raise ValueError(f"ids_restore must have shape (N={N}, L), got {tuple(ids_restore.shape)}")
    if K1 < 1 or K1 > L + 1:
        raise ValueError(f"x must have shape (N, 1+K, d) with 0 <= K <= L={L}, got {tuple(x.shape)}")
    check_shape(mask_token, "mask_token", (1, 1, d))
    check_shape(pos_embed, "pos_embed", (1, 1 + L, d))


# ============================================================================ Triton kernels

_BWD_CHUNK = 16  # rows per program in the backward (partial sums of d mask_token per chunk)
_BWD_TILE = 8192  # elements of g per backward program

if HAS_TRITON:

    @triton.jit
    def _unshuffle_fwd_kernel(
        x_ptr, ids_ptr, mt_ptr, pos_ptr, out_ptr,
        total, K, L, d,
        s_xn, s_xt, s_xd,
        s_idn, s_idl,
        s_m, s_pl, s_pd,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """``out[n, r] = src + pos[0, r]`` with ``src = x[n, 0]`` for r = 0, else
        ``x[n, 1 + j]`` if ``j = ids[n, r-1] < K`` else ``mask_token``.

        ``x (N, 1+K, d)``, ``ids (N, L)`` int64, ``mask_token (1, 1, d)``, ``pos (1, 1+L, d)``, any
        strides; ``out (N, 1+L, d)`` contiguous; fp32 sum, one rounding. ``ROWS`` output rows of
        ``BLOCK_D`` columns per program; grid ``(cdiv(N*(1+L), ROWS), cdiv(d, BLOCK_D))``.
        Bytes: read ``N*(1+K)*d`` (x, once) + ``(1+L)*d`` (pos, cached across n), write
        ``N*(1+L)*d``.
        """
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < total
        n = rows // (L + 1)
        r = rows % (L + 1)
        li = tl.maximum(r - 1, 0)
        j = tl.load(ids_ptr + n * s_idn + li * s_idl, mask=rmask & (r > 0), other=-1).to(tl.int64)
        # the cls row (r = 0, j = -1) reads x[n, 0]; an id outside [0, L) reads no row of x
        keep = (j < K) & ((r == 0) | (j >= 0))
        dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = dd < d
        m2 = rmask[:, None] & dmask[None, :]
        xv = tl.load(x_ptr + (n * s_xn + (j + 1) * s_xt)[:, None] + dd[None, :] * s_xd,
                     mask=m2 & keep[:, None], other=0.0).to(tl.float32)
        mt = tl.load(mt_ptr + dd * s_m, mask=dmask, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + (r * s_pl)[:, None] + dd[None, :] * s_pd, mask=m2, other=0.0).to(tl.float32)
        out = tl.where(keep[:, None], xv, mt[None, :]) + pos
        tl.store(out_ptr + (rows * d)[:, None] + dd[None, :], out.to(out_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _unshuffle_bwd_kernel(
        g_ptr, ids_ptr, dx_ptr, part_ptr,
        K, L, d, n_chunks,
        s_gn, s_gl, s_gd,
        s_idn, s_idl,
        CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Backward: ``dx[n, 0] = g[n, 0]``, ``dx[n, 1 + j] = g[n, 1 + l]`` where
        ``j = ids[n, l] < K``; the rows of removed positions are summed per program into
        ``part[n, chunk]`` (fp32), reduced afterwards in a fixed order (no atomics).

        ``g (N, 1+L, d)`` any strides; ``ids (N, L)`` int64; ``dx (N, 1+K, d)`` contiguous, every row
        written once (ids a permutation); ``part (N, n_chunks, d)`` fp32. One ``[CHUNK, BLOCK_D]``
        tile of g per program, loaded at once; grid ``(N, n_chunks, cdiv(d, BLOCK_D))``. Bytes: read
        ``N*(1+L)*d``, write ``N*(1+K)*d`` + the partials (``N*(1+L)/CHUNK*d`` fp32).
        """
        n = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
        dd = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_rows = r <= L
        j = tl.load(ids_ptr + n * s_idn + tl.maximum(r - 1, 0) * s_idl, mask=in_rows & (r > 0), other=-1).to(tl.int64)
        m2 = in_rows[:, None] & (dd < d)[None, :]
        g = tl.load(g_ptr + n * s_gn + r[:, None] * s_gl + dd[None, :] * s_gd, mask=m2, other=0.0)
        # the cls row (r = 0, j = -1) goes to dx[n, 0]; an id outside [0, L) is stored nowhere
        keep = (j < K) & ((r == 0) | (j >= 0))
        tl.store(dx_ptr + ((n * (K + 1) + j + 1) * d)[:, None] + dd[None, :], g.to(dx_ptr.dtype.element_ty),
                 mask=m2 & keep[:, None])
        removed = tl.where(m2 & (j >= K)[:, None], g.to(tl.float32), 0.0)
        tl.store(part_ptr + (n * n_chunks + tl.program_id(1)) * d + dd, tl.sum(removed, axis=0), mask=dd < d)


# ============================================================================ host launchers

def _out_dtype(x, mask_token, pos_embed):
    # As the reference: cat([x, mask tokens]) then + pos_embed, with type promotion.
    return torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)


def _launch_fwd(x, ids_restore, mask_token, pos_embed):
    N, K1, d = x.shape
    L = ids_restore.shape[1]
    out = torch.empty((N, 1 + L, d), dtype=_out_dtype(x, mask_token, pos_embed), device=x.device)
    if out.numel():
        ROWS, BLOCK_D, warps = rows_block(d)
        total = N * (1 + L)
        grid = (triton.cdiv(total, ROWS), triton.cdiv(d, BLOCK_D))
        _unshuffle_fwd_kernel[grid](
            x, ids_restore, mask_token, pos_embed, out, total, K1 - 1, L, d,
            *x.stride(), *ids_restore.stride(), mask_token.stride(2), pos_embed.stride(1), pos_embed.stride(2),
            ROWS=ROWS, BLOCK_D=BLOCK_D, num_warps=warps,
        )
    return out


def _n_chunks(L1: int) -> int:
    return (L1 + _BWD_CHUNK - 1) // _BWD_CHUNK


def _launch_bwd(grad, ids_restore, num_kept, x_dtype):
    """``(dx (N, 1+K, d), partial sums of d mask_token (N, chunks, d) fp32)``."""
    N, L1, d = grad.shape
    n_chunks = _n_chunks(L1)
    # zeros: with ids_restore a permutation every row is written once, but a row that no id names
    # (ids that are not one, unchecked without MAE_FAST_CHECK_IDS) must get 0, not stale memory.
    # The memset adds about a fifth to the backward's bytes at MAE's shapes (K+1 = 50 rows of dx
    # against 197 of g read and 50 written).
    dx = torch.zeros((N, 1 + num_kept, d), dtype=x_dtype, device=grad.device)
    part = torch.empty((N, n_chunks, d), dtype=torch.float32, device=grad.device)
    if grad.numel():
        BLOCK_D, _ = row_block(d, cap=_BWD_TILE // _BWD_CHUNK)
        warps = 8 if _BWD_CHUNK * BLOCK_D >= 4096 else 4
        grid = (N, n_chunks, triton.cdiv(d, BLOCK_D))
        _unshuffle_bwd_kernel[grid](
            grad, ids_restore, dx, part, num_kept, L1 - 1, d, n_chunks,
            *grad.stride(), *ids_restore.stride(),
            CHUNK=_BWD_CHUNK, BLOCK_D=BLOCK_D, num_warps=warps,
        )
    return dx, part


# ============================================================================ custom op + autograd

@torch.library.custom_op("mae_fast::unshuffle_mask_tokens", mutates_args=())
def _unshuffle_cop(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                   pos_embed: torch.Tensor) -> torch.Tensor:
    return _launch_fwd(x, ids_restore, mask_token, pos_embed)


@_unshuffle_cop.register_fake
def _(x, ids_restore, mask_token, pos_embed):
    return x.new_empty((x.shape[0], 1 + ids_restore.shape[1], x.shape[2]),
                       dtype=_out_dtype(x, mask_token, pos_embed))


@torch.library.custom_op("mae_fast::unshuffle_mask_tokens_backward", mutates_args=())
def _unshuffle_bwd_cop(grad: torch.Tensor, ids_restore: torch.Tensor, num_kept: int,
                       x_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_bwd(grad, ids_restore, num_kept, x_dtype)


@_unshuffle_bwd_cop.register_fake
def _(grad, ids_restore, num_kept, x_dtype):
    N, L1, d = grad.shape
    return (grad.new_empty((N, 1 + num_kept, d), dtype=x_dtype),
            grad.new_empty((N, _n_chunks(L1), d), dtype=torch.float32))


def _setup(ctx, inputs, output):
    x, ids_restore, mask_token, pos_embed = inputs
    ctx.save_for_backward(ids_restore)
    ctx.num_kept = x.shape[1] - 1
    ctx.dtypes = (x.dtype, mask_token.dtype, pos_embed.dtype)


def _backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    x_dt, m_dt, p_dt = ctx.dtypes
    dx = dmt = dpos = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
        dx, part = _unshuffle_bwd_cop(grad, ids_restore, ctx.num_kept, x_dt)
        if not ctx.needs_input_grad[0]:
            dx = None
        if ctx.needs_input_grad[2]:
            dmt = part.sum(dim=(0, 1)).view(1, 1, -1).to(m_dt)  # fixed-order reduction
    if ctx.needs_input_grad[3]:
        dpos = grad.sum(dim=0, keepdim=True, dtype=torch.float32).to(p_dt)
    return dx, None, dmt, dpos


_unshuffle_cop.register_autograd(_backward, setup_context=_setup)


# ============================================================================ registration

def _triton_problem(x, ids_restore, mask_token, pos_embed):
    return triton_problem(x=x, mask_token=mask_token, pos_embed=pos_embed)


unshuffle_mask_tokens_op.register("triton", _unshuffle_cop, _triton_problem)
