"""Embedding of the visible patches: the encoder's input ``(N, 1+K, D)``.

The reference (the authors' code) runs the patch-embedding conv over ALL ``L`` patches, adds
``pos_embed``, and then throws away the removed 75%. Patch embedding is a linear map of each patch,
so embedding only the kept patches computes the same thing with a quarter of the work.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import Op, autocast_dtype
from ._checks import (
    check_float,
    check_ids,
    check_patch_grid,
    check_same_device,
    check_shape,
    check_tensor,
    debug_check_ids,
)
from ._triton import HAS_TRITON, rows_block, tl, triton, triton_problem

# ============================================================================ reference

def gather_patches_reference(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(N, C, H, W)`` + ``(N, K)`` -> ``(N, K, C*P*P)``: kept patches' pixels in the conv
    weight's (c, p, q) order."""
    N, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(N, h * w, C * p * p)
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def embed_visible_patches_reference(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pos_embed: torch.Tensor,
    cls_token: torch.Tensor,
) -> torch.Tensor:
    """The authors' order of operations: conv over every patch, ``+ pos_embed[:, 1:]``, keep
    ``ids_keep``, prepend ``cls_token + pos_embed[:, :1]``."""
    P = weight.shape[-1]
    x = F.conv2d(imgs, weight, bias, stride=P).flatten(2).transpose(1, 2)  # (N, L, D)
    x = x + pos_embed[:, 1:, :]
    D = x.shape[-1]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    cls = (cls_token + pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    return torch.cat((cls, x), dim=1)


gather_patches_op = Op("gather_patches", gather_patches_reference)
embed_visible_patches_op = Op("embed_visible_patches", embed_visible_patches_reference)



# ============================================================================ entry point

def gather_patches(imgs, ids_keep, patch_size, *, backend=None):
    """``(N, C, H, W)`` + ``ids_keep (N, K)`` int64 -> ``(N, K, C*P*P)`` in (c, p, q) order.

    ``ids_keep`` must hold distinct ids in ``[0, L)`` per row (as from ``argsort``); with
    ``MAE_FAST_CHECK_IDS=1`` this is checked on the host (a device sync and a sort).
    """
    L = _check_gather_args(imgs, ids_keep, patch_size)
    debug_check_ids(ids_keep, "ids_keep", L)
    return gather_patches_op(imgs, ids_keep, patch_size, backend=backend)


def embed_visible_patches(imgs, ids_keep, weight, bias, pos_embed, cls_token, *, backend=None):
    """The encoder input ``(N, 1+K, D)``: ``imgs (N, C, H, W)``, ``ids_keep (N, K)`` int64 (distinct
    ids in ``[0, L)`` per row), patch-embedding conv ``weight (D, C, P, P)`` and ``bias (D,)``,
    ``pos_embed (1, 1+L, D)``, ``cls_token (1, 1, D)``. Row 0 is ``cls_token + pos_embed[:, 0]``,
    row ``1+k`` the embedding of patch ``ids_keep[:, k]`` plus its position.

    The triton backend embeds only the kept patches (one GEMM on ``N*K`` rows). With
    ``MAE_FAST_CHECK_IDS=1`` the ids are range- and uniqueness-checked on the host (a device sync
    and a sort of ``ids_keep``).
    """
    L = _check_embed_args(imgs, ids_keep, weight, bias, pos_embed, cls_token)
    debug_check_ids(ids_keep, "ids_keep", L)
    return embed_visible_patches_op(imgs, ids_keep, weight, bias, pos_embed, cls_token, backend=backend)


def _check_gather_args(imgs, ids_keep, patch_size) -> int:
    """Returns L, the patches per image."""
    check_tensor(imgs, "imgs", 4)
    check_tensor(ids_keep, "ids_keep", 2)
    check_float(imgs, "imgs")
    check_ids(ids_keep, "ids_keep")
    check_same_device(imgs, "imgs", ids_keep=ids_keep)
    L = check_patch_grid(imgs, patch_size)
    if ids_keep.shape[0] != imgs.shape[0]:
        raise ValueError(f"ids_keep must have shape (N={imgs.shape[0]}, K), got {tuple(ids_keep.shape)}")
    if ids_keep.shape[1] > L:
        raise ValueError(f"ids_keep must keep at most L={L} patches per image, got K={ids_keep.shape[1]}")
    return L


def _check_embed_args(imgs, ids_keep, weight, bias, pos_embed, cls_token) -> int:
    """Returns L, the patches per image."""
    check_tensor(weight, "weight", 4)
    if weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must have shape (D, C, P, P), got {tuple(weight.shape)}")
    P = int(weight.shape[-1])
    L = _check_gather_args(imgs, ids_keep, P)
    N, C, H, W = imgs.shape
    D = weight.shape[0]
    check_tensor(bias, "bias", 1)
    check_tensor(pos_embed, "pos_embed", 3)
    check_tensor(cls_token, "cls_token", 3)
    for name, t in (("weight", weight), ("bias", bias), ("pos_embed", pos_embed), ("cls_token", cls_token)):
        check_float(t, name)
    check_same_device(imgs, "imgs", weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    check_shape(weight, "weight", (D, C, P, P))
    check_shape(bias, "bias", (D,))
    check_shape(pos_embed, "pos_embed", (1, 1 + L, D))
    check_shape(cls_token, "cls_token", (1, 1, D))
    if autocast_dtype(imgs.device) is None and weight.dtype != imgs.dtype:
        raise TypeError(f"weight must have imgs' dtype {imgs.dtype} (outside autocast), got {weight.dtype}")
    return L


# ============================================================================ Triton kernels

if HAS_TRITON:

    @triton.jit
    def _patch_copy_kernel(
        img_ptr, ids_ptr, pat_ptr,
        total, K, CPP, WP, L,
        s_in, s_ic, s_ih, s_iw,
        s_idn, s_idk,
        s_pn, s_pk, s_pj,
        P: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, SCATTER: tl.constexpr,
    ):
        """Copy kept patches between an image and a patch matrix.

        ``img (N, C, H, W)`` any strides; ``ids (N, K)`` int64, any strides; ``pat (N, K, C*P*P)``
        any strides, pixel order (c, p, q) (the conv weight's). ``ROWS`` patches of ``BLOCK``
        pixels per program; grid ``(cdiv(N*K, ROWS), cdiv(C*P*P, BLOCK))``.
        SCATTER=False: gather ``pat[n, k] = img[n, :, patch ids[n, k]]``; SCATTER=True: the inverse
        (the backward), writing only the kept patches of a zero-filled ``img``. An id outside
        ``[0, L)`` touches no pixel (its patch row reads as zeros): never out of bounds.
        Bytes: ``N*K*C*P*P`` elements read and as many written (plus ``N*K`` ids).
        """
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < total
        n = rows // K
        k = rows % K
        l = tl.load(ids_ptr + n * s_idn + k * s_idk, mask=rmask, other=0).to(tl.int64)
        id_ok = rmask & (l >= 0) & (l < L)
        hi = l // WP
        wi = l % WP
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        c = (j // (P * P)).to(tl.int64)
        r = j % (P * P)
        p = r // P
        q = r % P
        m2 = rmask[:, None] & (j < CPP)[None, :]
        m_img = m2 & id_ok[:, None]
        p = p.to(tl.int64)  # p * s_ih can pass 2**31 in a large strided image
        q = q.to(tl.int64)
        img_off = ((n * s_in)[:, None] + (c * s_ic)[None, :] + (hi * P)[:, None] * s_ih + p[None, :] * s_ih
                   + (wi * P)[:, None] * s_iw + q[None, :] * s_iw)
        pat_off = (n * s_pn + k * s_pk)[:, None] + j.to(tl.int64)[None, :] * s_pj
        if SCATTER:
            v = tl.load(pat_ptr + pat_off, mask=m_img, other=0.0)
            tl.store(img_ptr + img_off, v.to(img_ptr.dtype.element_ty), mask=m_img)
        else:
            v = tl.load(img_ptr + img_off, mask=m_img, other=0.0)
            tl.store(pat_ptr + pat_off, v.to(pat_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _embed_epilogue_kernel(
        y_ptr, ids_ptr, bias_ptr, pos_ptr, cls_ptr, out_ptr,
        total, K, D, L,
        s_yn, s_yk, s_yd,
        s_idn, s_idk,
        s_b, s_pl, s_pd, s_c,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """The encoder input from the GEMM output.

        ``y (N, K, D)`` (patches @ weight^T), any strides; ``ids (N, K)`` int64; ``bias (D,)``;
        ``pos (1, 1+L, D)``; ``cls (1, 1, D)``; ``out (N, 1+K, D)`` contiguous.
        ``out[n, 0] = cls + pos[0]``, ``out[n, 1+k] = (y[n, k] + bias) + pos[1 + ids[n, k]]``, summed
        in fp32, one rounding to out's dtype. ``ROWS`` output rows of ``BLOCK_D`` columns per
        program; grid ``(cdiv(N*(1+K), ROWS), cdiv(D, BLOCK_D))``.
        Bytes: read ``N*K*D`` (y) + the pos rows (``N*(1+K)*D``, mostly L2 hits: ``(1+L)*D``
        distinct), write ``N*(1+K)*D``.
        """
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < total
        n = rows // (K + 1)
        r = rows % (K + 1)
        is_tok = r > 0
        k = tl.maximum(r - 1, 0)
        l = tl.load(ids_ptr + n * s_idn + k * s_idk, mask=rmask & is_tok, other=0).to(tl.int64)  # K may be 0
        prow = tl.where(is_tok, l + 1, 0)
        pos_ok = rmask & (prow >= 0) & (prow <= L)  # an id outside [0, L) reads no position row
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = d < D
        m2 = rmask[:, None] & dmask[None, :]
        y = tl.load(y_ptr + (n * s_yn + k * s_yk)[:, None] + d[None, :] * s_yd,
                    mask=m2 & is_tok[:, None], other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + d * s_b, mask=dmask, other=0.0).to(tl.float32)
        cl = tl.load(cls_ptr + d * s_c, mask=dmask, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + (prow * s_pl)[:, None] + d[None, :] * s_pd, mask=m2 & pos_ok[:, None],
                      other=0.0).to(tl.float32)
        out = tl.where(is_tok[:, None], y + b[None, :], cl[None, :]) + pos
        tl.store(out_ptr + (rows * D)[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=m2)


# ============================================================================ host launchers

def _launch_patch_copy(imgs, ids_keep, pat, P, scatter):
    N, C, H, W = imgs.shape
    K = ids_keep.shape[1]
    CPP = C * P * P
    if N * K * CPP == 0:
        return
    ROWS, BLOCK, warps = rows_block(CPP)
    grid = (triton.cdiv(N * K, ROWS), triton.cdiv(CPP, BLOCK))
    _patch_copy_kernel[grid](
        imgs, ids_keep, pat, N * K, K, CPP, W // P, (H // P) * (W // P),
        *imgs.stride(), *ids_keep.stride(), *pat.stride(),
        P=P, ROWS=ROWS, BLOCK=BLOCK, SCATTER=scatter, num_warps=warps,
    )


def _epilogue_dtype(y, bias, pos_embed, cls_token):
    # As the reference: conv output (+bias) + pos_embed, cat with cls_token + pos_embed: promotion.
    dt = torch.promote_types(y.dtype, bias.dtype)
    dt = torch.promote_types(dt, pos_embed.dtype)
    return torch.promote_types(dt, cls_token.dtype)


def _launch_epilogue(y, ids_keep, bias, pos_embed, cls_token):
    N, K, D = y.shape
    out = torch.empty((N, 1 + K, D), dtype=_epilogue_dtype(y, bias, pos_embed, cls_token), device=y.device)
    if out.numel():
        ROWS, BLOCK_D, warps = rows_block(D)
        total = N * (1 + K)
        grid = (triton.cdiv(total, ROWS), triton.cdiv(D, BLOCK_D))
        _embed_epilogue_kernel[grid](
            y, ids_keep, bias, pos_embed, cls_token, out, total, K, D, pos_embed.shape[1] - 1,
            *y.stride(), *ids_keep.stride(), bias.stride(0), pos_embed.stride(1), pos_embed.stride(2),
            cls_token.stride(2), ROWS=ROWS, BLOCK_D=BLOCK_D, num_warps=warps,
        )
    return out


# ============================================================================ custom ops + autograd

@torch.library.custom_op("mae_fast::gather_patches", mutates_args=())
def _gather_patches_cop(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int,
                        out_dtype: torch.dtype) -> torch.Tensor:
    N, C, H, W = imgs.shape
    K = ids_keep.shape[1]
    out = torch.empty((N, K, C * patch_size * patch_size), dtype=out_dtype, device=imgs.device)
    _launch_patch_copy(imgs, ids_keep, out, patch_size, scatter=False)
    return out


@_gather_patches_cop.register_fake
def _(imgs, ids_keep, patch_size, out_dtype):
    N, C, H, W = imgs.shape
    return imgs.new_empty((N, ids_keep.shape[1], C * patch_size * patch_size), dtype=out_dtype)


@torch.library.custom_op("mae_fast::scatter_patches", mutates_args=())
def _scatter_patches_cop(patches: torch.Tensor, ids_keep: torch.Tensor, patch_size: int,
                         channels: int, height: int, width: int, out_dtype: torch.dtype) -> torch.Tensor:
    N = patches.shape[0]
    # Zero-filled on purpose: only the kept patches receive a gradient.
    out = torch.zeros((N, channels, height, width), dtype=out_dtype, device=patches.device)
    _launch_patch_copy(out, ids_keep, patches, patch_size, scatter=True)
    return out


@_scatter_patches_cop.register_fake
def _(patches, ids_keep, patch_size, channels, height, width, out_dtype):
    return patches.new_empty((patches.shape[0], channels, height, width), dtype=out_dtype)


def _gather_setup(ctx, inputs, output):
    imgs, ids_keep, patch_size, out_dtype = inputs
    ctx.save_for_backward(ids_keep)
    ctx.patch_size = patch_size
    ctx.img_shape = tuple(imgs.shape)
    ctx.img_dtype = imgs.dtype


def _gather_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    dimgs = None
    if ctx.needs_input_grad[0]:
        _, C, H, W = ctx.img_shape
        dimgs = _scatter_patches_cop(grad, ids_keep, ctx.patch_size, C, H, W, ctx.img_dtype)
    return dimgs, None, None, None


_gather_patches_cop.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("mae_fast::embed_epilogue", mutates_args=())
def _embed_epilogue_cop(y: torch.Tensor, ids_keep: torch.Tensor, bias: torch.Tensor,
                        pos_embed: torch.Tensor, cls_token: torch.Tensor) -> torch.Tensor:
    return _launch_epilogue(y, ids_keep, bias, pos_embed, cls_token)


@_embed_epilogue_cop.register_fake
def _(y, ids_keep, bias, pos_embed, cls_token):
    N, K, D = y.shape
    return y.new_empty((N, 1 + K, D), dtype=_epilogue_dtype(y, bias, pos_embed, cls_token))


def _epilogue_setup(ctx, inputs, output):
    y, ids_keep, bias, pos_embed, cls_token = inputs
    ctx.save_for_backward(ids_keep)
    ctx.dtypes = (y.dtype, bias.dtype, pos_embed.dtype, cls_token.dtype)
    ctx.L = pos_embed.shape[1] - 1


def _epilogue_backward(ctx, grad):
    """Deterministic: every reduction is a torch sum over a fixed shape, no atomics."""
    (ids_keep,) = ctx.saved_tensors
    y_dt, b_dt, p_dt, c_dt = ctx.dtypes
    N, K1, D = grad.shape
    g_tok = grad[:, 1:]
    dy = g_tok.to(y_dt) if ctx.needs_input_grad[0] else None
    dbias = g_tok.sum(dim=(0, 1), dtype=torch.float32).to(b_dt) if ctx.needs_input_grad[2] else None
    dcls_row = None
    if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
        dcls_row = grad[:, 0].sum(dim=0, dtype=torch.float32)  # (D,)
    dcls = dcls_row.view(1, 1, D).to(c_dt) if ctx.needs_input_grad[4] else None
    dpos = None
    if ctx.needs_input_grad[3]:
        # Positions get gradients from several rows: scatter into (N, L, D) (ids distinct within a
        # row, so no collision) and sum over N: a fixed-order reduction, no float atomics.
        # An id outside [0, L) lands in a spare last row that is dropped (never out of bounds).
        z = grad.new_zeros((N, ctx.L + 1, D), dtype=torch.float32)
        rows = torch.where((ids_keep >= 0) & (ids_keep < ctx.L), ids_keep, ctx.L)
        z.scatter_(1, rows.unsqueeze(-1).expand(N, K1 - 1, D), g_tok.to(torch.float32))
        dpos = torch.cat([dcls_row.view(1, D), z[:, :ctx.L].sum(dim=0)], dim=0).view(1, 1 + ctx.L, D).to(p_dt)
    return dy, None, dbias, dpos, dcls


_embed_epilogue_cop.register_autograd(_epilogue_backward, setup_context=_epilogue_setup)


# ============================================================================ registration

def _gather_patches_triton(imgs, ids_keep, patch_size):
    return _gather_patches_cop(imgs, ids_keep, patch_size, imgs.dtype)


def _embed_visible_patches_triton(imgs, ids_keep, weight, bias, pos_embed, cls_token):
    """gather (Triton) -> ONE GEMM on the kept patches -> fused bias + pos_embed + cls (Triton)."""
    N, C, H, W = imgs.shape
    D, _, P, _ = weight.shape
    K = ids_keep.shape[1]
    # Under autocast the GEMM runs in the autocast dtype: gather straight into it (saves a cast pass).
    gdt = autocast_dtype(imgs.device) or imgs.dtype
    patches = _gather_patches_cop(imgs, ids_keep, P, gdt)
    # The GEMM: TF32 in fp32 follows the user's torch.backends setting (we never enable it).
    y = torch.matmul(patches.view(N * K, C * P * P), weight.reshape(D, C * P * P).t())
    return _embed_epilogue_cop(y.view(N, K, D), ids_keep, bias, pos_embed, cls_token)


def _gather_problem(imgs, ids_keep, patch_size):
    return triton_problem(imgs=imgs)


def _embed_problem(imgs, ids_keep, weight, bias, pos_embed, cls_token):
    return triton_problem(imgs=imgs, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)


gather_patches_op.register("triton", _gather_patches_triton, _gather_problem)
embed_visible_patches_op.register("triton", _embed_visible_patches_triton, _embed_problem)
