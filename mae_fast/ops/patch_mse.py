"""MAE's loss: MSE per patch against (optionally per-patch normalised) pixels, mean over the
removed patches."""
from __future__ import annotations

from typing import Optional

import torch

from ._backend import Op, Problem
from ._checks import check_float, check_ids, check_patch_grid, check_same_device, check_tensor, debug_check_ids
from ._triton import HAS_TRITON, next_pow2, tl, triton, triton_problem
from .patches import patchify

NORM_PIX_EPS = 1e-6
_MAX_TILE = 16384  # padded values per patch, next_pow2(P)**2 * next_pow2(C), one program holds
_TILE_ELEMS = 4096  # padded values per program: several small patches share one


# ============================================================================ reference

def patch_mse_loss_reference(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool,
    pred_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The authors' ``forward_loss``: ``pred (N, L, P*P*C)``, ``imgs (N, C, H, W)``, ``mask (N, L)``
    with 1 = removed. The variance is unbiased (torch's default), as in the reference. A mask with
    no removed patch gives 0/0 = NaN, as in the reference: the model rejects such ratios first.

    With ``pred_ids (N, M)``: ``pred (N, M, P*P*C)`` holds the predictions of patches
    ``pred_ids[n, m]`` only (e.g. the removed ones); each is weighted by its mask value and the sum
    is divided by ``mask.sum()`` as before, so passing the removed patches gives the same loss."""
    target = patchify(imgs, patch_size)
    if pred_ids is not None:
        target = torch.gather(target, 1, pred_ids.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    m = mask if pred_ids is None else torch.gather(mask, 1, pred_ids)
    return (loss * m).sum() / mask.sum()


patch_mse_loss_op = Op("patch_mse_loss", patch_mse_loss_reference)


# ============================================================================ entry point

def patch_mse_loss(pred, imgs, mask, patch_size, norm_pix_loss=False, *, pred_ids=None, backend=None):
    """MAE's loss: ``pred (N, L, P*P*C)`` in (p, q, c) pixel order, ``imgs (N, C, H, W)``,
    ``mask (N, L)`` (1 = removed), per-patch normalised target if ``norm_pix_loss`` (unbiased
    variance, eps 1e-6); mean per patch, then ``(loss * mask).sum() / mask.sum()``.

    ``pred_ids (N, M)`` int64 (optional): ``pred (N, M, P*P*C)`` holds only the patches
    ``pred_ids[n, m]`` (e.g. the removed ones, ``ids_shuffle[:, K:]``). With ``MAE_FAST_CHECK_IDS=1``
    they are checked on the host (in range, no repeat: a device sync and a sort).

    The triton backend gives the same bits on every run (per-program partial sums, then a
    fixed-order sum; no atomics). Its gradient w.r.t. ``mask`` is not computed at ``mask == 0`` patches unless
    ``mask.requires_grad`` (then no patch is skipped). Skipping kept patches has one visible
    difference: a NaN/inf in a kept patch's prediction does not reach the loss (the reference's
    ``loss * mask`` turns it into NaN); a NaN in a removed patch does, as in the reference.
    Ids outside ``[0, L)`` (without the debug check) read no memory: their patches weigh 0."""
    L = _check_args(pred, imgs, mask, patch_size, norm_pix_loss, pred_ids)
    if pred_ids is not None:
        debug_check_ids(pred_ids, "pred_ids", L)
    return patch_mse_loss_op(pred, imgs, mask, patch_size, norm_pix_loss, pred_ids, backend=backend)


def _check_args(pred, imgs, mask, patch_size, norm_pix_loss, pred_ids) -> int:
    """Returns L, the patches per image."""
    check_tensor(pred, "pred", 3)
    check_tensor(imgs, "imgs", 4)
    check_tensor(mask, "mask", 2)
    check_float(pred, "pred")
    check_float(imgs, "imgs")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise TypeError(f"mask must be a float or bool tensor, got {mask.dtype}")
    check_same_device(pred, "pred", imgs=imgs, mask=mask)
    L = check_patch_grid(imgs, patch_size)
    if not isinstance(norm_pix_loss, bool):
        raise TypeError(f"norm_pix_loss must be a bool, got {type(norm_pix_loss).__name__}")
    N, C, P = imgs.shape[0], imgs.shape[1], patch_size
    if tuple(mask.shape) != (N, L):
        raise ValueError(f"mask must have shape (N={N}, L={L}), got {tuple(mask.shape)}")
    if pred_ids is None:
        expected = (N, L, P * P * C)
    else:
        check_tensor(pred_ids, "pred_ids", 2)
        check_ids(pred_ids, "pred_ids")
        check_same_device(pred, "pred", pred_ids=pred_ids)
        if pred_ids.shape[0] != N or pred_ids.shape[1] > L:
            raise ValueError(f"pred_ids must have shape (N={N}, M) with M <= L={L}, got {tuple(pred_ids.shape)}")
        expected = (N, pred_ids.shape[1], P * P * C)
    if tuple(pred.shape) != expected:
        raise ValueError(f"pred must have shape {expected} (N, {'L' if pred_ids is None else 'M'}, P*P*C), "
                         f"got {tuple(pred.shape)}")
    return L


# ============================================================================ Triton kernels
#
# One program handles R patches as a [R, P_PAD, P_PAD, C_PAD] tile in pred's (p, q, c) order. The
# image is read as [R, C_PAD, P_PAD, P_PAD] (q fastest: each patch row is P contiguous pixels, so
# loads coalesce and vectorise) and transposed in registers; reading it in pred's order instead
# would put neighbouring lanes H*W apart, one per channel.

if HAS_TRITON:

    @triton.jit
    def _patch_rows(pid, total, ids_ptr, M, L, s_idn, s_idm, R: tl.constexpr, HAS_IDS: tl.constexpr):
        """The R rows ``(n, m)`` of ``(N, M)`` of program ``pid``: ``(rows, in_rows, n, m, l, ok)``
        with ``l`` the patch id (``ids[n, m]`` if HAS_IDS, else ``m``) and ``ok`` False for a row
        past the end or an id outside ``[0, L)`` (no pixel of it is read)."""
        rows = pid.to(tl.int64) * R + tl.arange(0, R)
        in_rows = rows < total
        n = rows // M
        mi = rows % M
        if HAS_IDS:
            l = tl.load(ids_ptr + n * s_idn + mi * s_idm, mask=in_rows, other=-1).to(tl.int64)
        else:
            l = mi
        return rows, in_rows, n, mi, l, in_rows & (l >= 0) & (l < L)

    @triton.jit
    def _pred_offsets(P: tl.constexpr, C: tl.constexpr, P_PAD: tl.constexpr, C_PAD: tl.constexpr):
        """``(j, inside)``: the index ``(p*P + q)*C + c`` of each tile slot in a patch's row of
        pred, ``[1, P_PAD, P_PAD, C_PAD]``, and whether the slot is a pixel (not padding)."""
        p = tl.arange(0, P_PAD)[None, :, None, None]
        q = tl.arange(0, P_PAD)[None, None, :, None]
        c = tl.arange(0, C_PAD)[None, None, None, :]
        return (p * P + q) * C + c, (p < P) & (q < P) & (c < C)

    @triton.jit
    def _sum_patch(x):
        """``[R, a, b, c]`` -> ``[R]``: the sum over each patch's tile."""
        return tl.sum(tl.sum(tl.sum(x, axis=3), axis=2), axis=1)

    @triton.jit
    def _patch_targets(img_ptr, n, l, live, inside, WP, s_in, s_ic, s_ih, s_iw,
                       P: tl.constexpr, C: tl.constexpr, P_PAD: tl.constexpr, C_PAD: tl.constexpr,
                       NORM: tl.constexpr, EPS: tl.constexpr):
        """The targets of patches ``l`` of images ``n`` (``[R]`` each; rows where ``live`` is False
        are not read): ``[R, P_PAD, P_PAD, C_PAD]`` fp32 in pred's order, zero on padding
        (``inside`` False, see :func:`_pred_offsets`), normalised per patch if NORM (unbiased
        variance, as ``torch.var``)."""
        c = tl.arange(0, C_PAD)[None, :, None, None]
        p = tl.arange(0, P_PAD)[None, None, :, None]
        q = tl.arange(0, P_PAD)[None, None, None, :]
        base = n * s_in + (l // WP) * P * s_ih + (l % WP) * P * s_iw  # l is int64: no 32-bit product
        off = base[:, None, None, None] + c.to(tl.int64) * s_ic + p.to(tl.int64) * s_ih + q.to(tl.int64) * s_iw
        m = live[:, None, None, None] & (c < C) & (p < P) & (q < P)
        raw = tl.load(img_ptr + off, mask=m, other=0.0)
        t = tl.permute(raw, (0, 2, 3, 1)).to(tl.float32)  # transposed in the input dtype: half the bytes
        if NORM:
            n_pix = P * P * C
            mean = _sum_patch(t) / n_pix
            diff = tl.where(inside, t - mean[:, None, None, None], 0.0)
            var = _sum_patch(diff * diff) / (n_pix - 1)
            t = tl.div_rn(diff, tl.sqrt_rn(var + EPS)[:, None, None, None])
        return t

    @triton.jit
    def _patch_errors(pred_ptr, img_ptr, n, mi, l, live, WP,
                      s_pn, s_pm, s_pj, s_in, s_ic, s_ih, s_iw,
                      P: tl.constexpr, C: tl.constexpr, P_PAD: tl.constexpr, C_PAD: tl.constexpr,
                      NORM: tl.constexpr, EPS: tl.constexpr):
        """``pred - target`` of the R patches, fp32 ``[R, P_PAD, P_PAD, C_PAD]``, zero where not
        ``live`` and on padding; also ``j`` and ``inside`` (see :func:`_pred_offsets`)."""
        j, inside = _pred_offsets(P, C, P_PAD, C_PAD)
        m = live[:, None, None, None] & inside
        t = _patch_targets(img_ptr, n, l, live, inside, WP, s_in, s_ic, s_ih, s_iw, P, C, P_PAD, C_PAD, NORM, EPS)
        x = tl.load(pred_ptr + (n * s_pn + mi * s_pm)[:, None, None, None] + j.to(tl.int64) * s_pj,
                    mask=m, other=0.0).to(tl.float32)
        return tl.where(m, x - t, 0.0), j, inside

    @triton.jit
    def _mask_at(mask_ptr, n, l, ok, s_mn, s_ml):
        """``mask[n, l]`` as fp32, 0 where not ``ok``."""
        return tl.load(mask_ptr + n * s_mn + tl.where(ok, l, 0) * s_ml, mask=ok, other=0).to(tl.float32)

    @triton.jit
    def _patch_mse_fwd_kernel(
        pred_ptr, img_ptr, mask_ptr, ids_ptr, out_ptr,
        total, M, L, WP, mask_total, mask_chunk,
        s_pn, s_pm, s_pj,
        s_in, s_ic, s_ih, s_iw,
        s_mn, s_ml,
        s_idn, s_idm,
        P: tl.constexpr, C: tl.constexpr, P_PAD: tl.constexpr, C_PAD: tl.constexpr, R: tl.constexpr,
        MBLOCK: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr, HAS_IDS: tl.constexpr,
        WEIGHTED: tl.constexpr,
    ):
        """Per-patch MSE ``e[n, m] = mean_j (pred[n, m, j] - target[n, l, j])**2``, ``l = ids[n, m]``
        (HAS_IDS) or ``m``.

        WEIGHTED: ``out (programs, 2)`` fp32 gets this program's ``sum_r mask[n, l] * e`` (patches
        with ``mask == 0``, the kept ones, are not read) and its ``mask_chunk`` elements' share of
        ``mask.sum()``; a fixed-order sum of these partials is the loss (no atomics: the same bits
        on every run). Else ``out (N*M,)`` fp32 gets every ``e``.

        ``pred (N, M, P*P*C)``, ``img (N, C, H, W)``, ``mask (N, L)`` (float or bool), ``ids (N, M)``
        int64: any strides. Grid ``(cdiv(N*M, R),)``. Bytes: pred and imgs of the weighted patches
        once (``2 * N*M_removed*P*P*C`` elements), mask once, 8 bytes per program.
        """
        pid = tl.program_id(0)
        rows, in_rows, n, mi, l, ok = _patch_rows(pid, total, ids_ptr, M, L, s_idn, s_idm, R, HAS_IDS)
        if WEIGHTED:
            w = _mask_at(mask_ptr, n, l, ok, s_mn, s_ml)
            live = ok & (w != 0.0)
        else:
            live = ok
        e, _, _ = _patch_errors(pred_ptr, img_ptr, n, mi, l, live, WP, s_pn, s_pm, s_pj, s_in, s_ic, s_ih, s_iw,
                                P, C, P_PAD, C_PAD, NORM, EPS)
        per_patch = _sum_patch(e * e) / (P * P * C)
        if WEIGHTED:
            tl.store(out_ptr + 2 * pid, tl.sum(per_patch * w, axis=0))  # 0 * 0 for a row not read
            acc = tl.zeros([MBLOCK], dtype=tl.float32)
            for i in range(0, mask_chunk, MBLOCK):
                k = i + tl.arange(0, MBLOCK)
                idx = pid.to(tl.int64) * mask_chunk + k
                acc += tl.load(mask_ptr + (idx // L) * s_mn + (idx % L) * s_ml,
                               mask=(k < mask_chunk) & (idx < mask_total), other=0).to(tl.float32)
            tl.store(out_ptr + 2 * pid + 1, tl.sum(acc, axis=0))
        else:
            tl.store(out_ptr + rows, per_patch, mask=in_rows)

    @triton.jit
    def _patch_mse_finish_kernel(part_ptr, n_part, loss_ptr, msum_ptr, BLOCK: tl.constexpr):
        """``loss = sum(part[:, 0]) / sum(part[:, 1])`` in a fixed order (one program); also
        writes the mask sum, which the backward reuses. ``part (n_part, 2)`` fp32 contiguous."""
        r = tl.arange(0, BLOCK)[:, None]
        col = tl.arange(0, 2)[None, :]
        acc = tl.zeros([BLOCK, 2], dtype=tl.float32)
        for i in range(0, n_part, BLOCK):
            acc += tl.load(part_ptr + (i + r) * 2 + col, mask=(i + r) < n_part, other=0.0)
        sums = tl.sum(acc, axis=0)
        num = tl.sum(tl.where(col == 0, sums[None, :], 0.0), axis=1)
        den = tl.sum(tl.where(col == 1, sums[None, :], 0.0), axis=1)
        tl.store(msum_ptr + tl.arange(0, 1), den)
        tl.store(loss_ptr + tl.arange(0, 1), (num / den).to(loss_ptr.dtype.element_ty))

    @triton.jit
    def _patch_mse_bwd_kernel(
        pred_ptr, img_ptr, coef_ptr, ids_ptr, g_ptr, msum_ptr, dpred_ptr,
        total, M, L, WP,
        s_pn, s_pm, s_pj,
        s_in, s_ic, s_ih, s_iw,
        s_cn, s_cm,
        s_idn, s_idm,
        P: tl.constexpr, C: tl.constexpr, P_PAD: tl.constexpr, C_PAD: tl.constexpr, R: tl.constexpr,
        NORM: tl.constexpr, EPS: tl.constexpr, HAS_IDS: tl.constexpr, WEIGHTED: tl.constexpr,
    ):
        """``dpred[n, m, j] = coef[n, m] * 2 * (pred - target) / (P*P*C)``: WEIGHTED, ``coef_ptr``
        is the mask and ``coef = mask[n, l] * g / msum`` (``g``, ``msum``: fp32 scalars in device
        memory, no host sync); else ``coef_ptr`` is the per-patch gradient ``(N, M)``. Rows with
        ``coef == 0`` (the kept patches) are written as zeros without reading pred or imgs.

        ``dpred (N, M, P*P*C)`` contiguous, pred's dtype, every element written. Grid
        ``(cdiv(N*M, R),)``. Bytes: pred and imgs of the removed patches, all of dpred.
        """
        rows, in_rows, n, mi, l, ok = _patch_rows(tl.program_id(0), total, ids_ptr, M, L, s_idn, s_idm, R, HAS_IDS)
        if WEIGHTED:
            scale = tl.load(g_ptr).to(tl.float32) / tl.load(msum_ptr)
            coef = _mask_at(coef_ptr, n, l, ok, s_cn, s_cm) * scale
        else:
            coef = tl.load(coef_ptr + n * s_cn + mi * s_cm, mask=ok, other=0.0).to(tl.float32)
        live = ok & (coef != 0.0)
        e, j, inside = _patch_errors(pred_ptr, img_ptr, n, mi, l, live, WP, s_pn, s_pm, s_pj, s_in, s_ic, s_ih, s_iw,
                                     P, C, P_PAD, C_PAD, NORM, EPS)
        dx = e * (coef * (2.0 / (P * P * C)))[:, None, None, None]
        tl.store(dpred_ptr + rows[:, None, None, None] * (P * P * C) + j, dx.to(dpred_ptr.dtype.element_ty),
                 mask=in_rows[:, None, None, None] & inside)


# ============================================================================ host launchers

def _tile_problem(channels: int, patch_size: int) -> Problem:
    """Why one program cannot hold a patch of this size, or None."""
    if next_pow2(patch_size) ** 2 * next_pow2(channels) > _MAX_TILE:
        return ValueError, (f"the triton patch_mse_loss handles next_pow2(patch_size)**2 * next_pow2(channels) "
                            f"<= {_MAX_TILE} values per patch (patch_size <= 64 with 3 channels), got "
                            f"patch_size={patch_size}, channels={channels}; backend='torch' takes any size")
    return None


def _tile(imgs: torch.Tensor, patch_size: int) -> dict:
    """The kernels' compile-time tile: padded patch dims, patches per program, warps."""
    C, P = imgs.shape[1], patch_size
    P_PAD, C_PAD = next_pow2(P), next_pow2(C)
    per_patch = P_PAD * P_PAD * C_PAD
    R = max(1, _TILE_ELEMS // per_patch)
    return {"P": P, "C": C, "P_PAD": P_PAD, "C_PAD": C_PAD, "R": R,
            "num_warps": 8 if R * per_patch >= 4096 else 4}


def _grid_size(total: int, R: int) -> int:
    return max(1, triton.cdiv(total, R))  # at least one program: it also sums the mask


def _geometry(imgs, patch_size):
    """(WP, L): patches per image row and per image."""
    WP = imgs.shape[3] // patch_size
    return WP, (imgs.shape[2] // patch_size) * WP


def _ids_or(pred_ids, dummy):
    # A dummy pointer (never read) when HAS_IDS is False.
    return pred_ids if pred_ids is not None else dummy


def _launch_fwd(pred, imgs, mask, pred_ids, patch_size, norm_pix_loss, weighted):
    """The forward kernel. Returns, fp32, the per-program partial sums ``(grid, 2)`` if
    ``weighted``, else the per-patch losses ``(N, M)`` (``mask`` is then not read)."""
    N, M, _ = pred.shape
    tile = _tile(imgs, patch_size)
    WP, L = _geometry(imgs, patch_size)
    grid = _grid_size(N * M, tile["R"])
    out = torch.empty((grid, 2) if weighted else (N, M), dtype=torch.float32, device=pred.device)
    if not weighted:
        mask = out  # a 2-D dummy, never read
    mask_total = mask.numel() if weighted else 0
    mask_chunk = triton.cdiv(mask_total, grid)
    ids = _ids_or(pred_ids, mask)
    _patch_mse_fwd_kernel[(grid,)](  # max(M, 1): with M = 0 one program still runs (no row), no division by 0
        pred, imgs, mask, ids, out, N * M, max(M, 1), L, WP, mask_total, mask_chunk,
        *pred.stride(), *imgs.stride(), *mask.stride(), *ids.stride(),
        MBLOCK=min(next_pow2(max(mask_chunk, 1)), 256), NORM=norm_pix_loss, EPS=NORM_PIX_EPS,
        HAS_IDS=pred_ids is not None, WEIGHTED=weighted, **tile,
    )
    return out


def _launch_bwd(grad, pred, imgs, coef, pred_ids, msum, patch_size, norm_pix_loss, weighted):
    N, M, PPC = pred.shape
    dpred = torch.empty((N, M, PPC), dtype=pred.dtype, device=pred.device)
    if dpred.numel():
        tile = _tile(imgs, patch_size)
        WP, L = _geometry(imgs, patch_size)
        ids = _ids_or(pred_ids, coef)
        _patch_mse_bwd_kernel[(_grid_size(N * M, tile["R"]),)](
            pred, imgs, coef, ids, grad, msum, dpred, N * M, M, L, WP,
            *pred.stride(), *imgs.stride(), *coef.stride(), *ids.stride(),
            NORM=norm_pix_loss, EPS=NORM_PIX_EPS, HAS_IDS=pred_ids is not None, WEIGHTED=weighted, **tile,
        )
    return dpred


# ============================================================================ custom ops + autograd

@torch.library.custom_op("mae_fast::patch_mse_loss", mutates_args=())
def _patch_mse_cop(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, pred_ids: Optional[torch.Tensor],
                   patch_size: int, norm_pix_loss: bool, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, mask.sum())``: the loss ``()`` in ``out_dtype`` and the mask sum ``()`` fp32 (kept
    for the backward). Two launches: per-program partial sums, then their fixed-order sum."""
    part = _launch_fwd(pred, imgs, mask, pred_ids, patch_size, norm_pix_loss, weighted=True)
    loss = torch.empty((), dtype=out_dtype, device=pred.device)
    msum = torch.empty((), dtype=torch.float32, device=pred.device)
    _patch_mse_finish_kernel[(1,)](part, part.shape[0], loss, msum, BLOCK=1024, num_warps=4)
    return loss, msum


@_patch_mse_cop.register_fake
def _(pred, imgs, mask, pred_ids, patch_size, norm_pix_loss, out_dtype):
    return pred.new_empty((), dtype=out_dtype), pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("mae_fast::patch_mse_loss_backward", mutates_args=())
def _patch_mse_bwd_cop(grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
                       pred_ids: Optional[torch.Tensor], msum: torch.Tensor, patch_size: int,
                       norm_pix_loss: bool) -> torch.Tensor:
    """d loss / d pred, one launch: ``grad`` and ``msum`` are read on the device."""
    return _launch_bwd(grad, pred, imgs, mask, pred_ids, msum, patch_size, norm_pix_loss, weighted=True)


@_patch_mse_bwd_cop.register_fake
def _(grad, pred, imgs, mask, pred_ids, msum, patch_size, norm_pix_loss):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _patch_weights(mask: torch.Tensor, pred_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """``mask`` at the predicted patches, fp32 ``(N, M)``; 0 for an id outside ``[0, L)``."""
    maskf = mask.to(torch.float32)
    if pred_ids is None:
        return maskf
    in_range = (pred_ids >= 0) & (pred_ids < maskf.shape[1])
    return torch.gather(maskf, 1, pred_ids.clamp(0, maskf.shape[1] - 1)) * in_range


def _mse_setup(ctx, inputs, output):
    pred, imgs, mask, pred_ids, patch_size, norm_pix_loss, out_dtype = inputs
    ctx.save_for_backward(pred, imgs, mask, pred_ids, output[1])
    ctx.patch_size = patch_size
    ctx.norm_pix_loss = norm_pix_loss
    ctx.mark_non_differentiable(output[1])


def _mse_backward(ctx, grad, _grad_msum):
    pred, imgs, mask, pred_ids, msum = ctx.saved_tensors
    P, norm = ctx.patch_size, ctx.norm_pix_loss
    dpred = dimgs = None
    if ctx.needs_input_grad[0]:
        dpred = _patch_mse_bwd_cop(grad, pred, imgs, mask, pred_ids, msum, P, norm)
    if ctx.needs_input_grad[1]:
        coef = _patch_weights(mask, pred_ids) * (grad.float() / msum)
        dimgs = _imgs_grad(coef, pred, imgs, pred_ids, P, norm)
    return dpred, dimgs, None, None, None, None, None


_patch_mse_cop.register_autograd(_mse_backward, setup_context=_mse_setup)


# Per-patch losses: only for a mask that requires grad (its gradient is taken by torch).

@torch.library.custom_op("mae_fast::patch_mse_per_patch", mutates_args=())
def _patch_loss_cop(pred: torch.Tensor, imgs: torch.Tensor, pred_ids: Optional[torch.Tensor],
                    patch_size: int, norm_pix_loss: bool) -> torch.Tensor:
    """Per-patch MSE ``(N, M)`` fp32, every patch read."""
    return _launch_fwd(pred, imgs, None, pred_ids, patch_size, norm_pix_loss, weighted=False)


@_patch_loss_cop.register_fake
def _(pred, imgs, pred_ids, patch_size, norm_pix_loss):
    return pred.new_empty(pred.shape[:2], dtype=torch.float32)


@torch.library.custom_op("mae_fast::patch_mse_per_patch_backward", mutates_args=())
def _patch_loss_bwd_cop(grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, pred_ids: Optional[torch.Tensor],
                        patch_size: int, norm_pix_loss: bool) -> torch.Tensor:
    return _launch_bwd(grad, pred, imgs, grad, pred_ids, grad, patch_size, norm_pix_loss, weighted=False)


@_patch_loss_bwd_cop.register_fake
def _(grad, pred, imgs, pred_ids, patch_size, norm_pix_loss):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _per_patch_setup(ctx, inputs, output):
    pred, imgs, pred_ids, patch_size, norm_pix_loss = inputs
    ctx.save_for_backward(pred, imgs, pred_ids)
    ctx.patch_size = patch_size
    ctx.norm_pix_loss = norm_pix_loss


def _per_patch_backward(ctx, grad):
    pred, imgs, pred_ids = ctx.saved_tensors
    dpred = dimgs = None
    if ctx.needs_input_grad[0]:
        dpred = _patch_loss_bwd_cop(grad, pred, imgs, pred_ids, ctx.patch_size, ctx.norm_pix_loss)
    if ctx.needs_input_grad[1]:
        dimgs = _imgs_grad(grad, pred, imgs, pred_ids, ctx.patch_size, ctx.norm_pix_loss)
    return dpred, dimgs, None, None, None


_patch_loss_cop.register_autograd(_per_patch_backward, setup_context=_per_patch_setup)


def _imgs_grad(coef, pred, imgs, pred_ids, P, norm):
    """d loss / d imgs in torch (an unusual need: only when imgs requires grad), given
    ``coef (N, M)`` = d loss / d (per-patch MSE), 0 at an id outside ``[0, L)`` (both callers
    weigh such patches by :func:`_patch_weights`)."""
    N, C, H, W = imgs.shape
    h, w = H // P, W // P
    u = patchify(imgs.float(), P)  # (N, L, PPC)
    if pred_ids is not None:
        pred_ids = pred_ids.clamp(0, h * w - 1)  # an out-of-range id (coef 0) must still index in bounds
        u = torch.gather(u, 1, pred_ids.unsqueeze(-1).expand(-1, -1, u.shape[-1]))
    n_pix = u.shape[-1]
    t = u
    if norm:
        mean = u.mean(dim=-1, keepdim=True)
        s = (u.var(dim=-1, keepdim=True) + NORM_PIX_EPS).sqrt()
        t = (u - mean) / s
    dt = -(2.0 / n_pix) * (pred.float() - t) * coef.float().unsqueeze(-1)
    if norm:
        # t = (u - mean) / s, s**2 = var + eps (unbiased): du = (dt - mean(dt) - t * sum(dt t)/(n-1)) / s
        dt = (dt - dt.mean(dim=-1, keepdim=True) - t * (dt * t).sum(dim=-1, keepdim=True) / (n_pix - 1)) / s
    if pred_ids is not None:
        full = dt.new_zeros((N, h * w, n_pix))
        # ids distinct in range; a clamped one adds a zero row: the same sum in any order
        full.scatter_add_(1, pred_ids.unsqueeze(-1).expand(-1, -1, n_pix), dt)
        dt = full
    dimgs = dt.reshape(N, h, w, P, P, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, H, W)
    return dimgs.to(imgs.dtype)


# ============================================================================ registration

def _patch_mse_loss_triton(pred, imgs, mask, patch_size, norm_pix_loss, pred_ids=None):
    """Two launches forward (per-program partial sums reading pred and imgs at the removed
    patches only, then their fixed-order sum: deterministic), one backward. A mask that requires
    grad takes the per-patch kernel and a torch reduction instead."""
    out_dtype = torch.promote_types(pred.dtype, imgs.dtype)
    if mask.is_floating_point():
        out_dtype = torch.promote_types(out_dtype, mask.dtype)
    if mask.requires_grad:
        per_patch = _patch_loss_cop(pred, imgs, pred_ids, patch_size, norm_pix_loss)
        maskf = mask.to(torch.float32)
        return ((per_patch * _patch_weights(maskf, pred_ids)).sum() / maskf.sum()).to(out_dtype)
    return _patch_mse_cop(pred, imgs, mask, pred_ids, patch_size, norm_pix_loss, out_dtype)[0]


def _triton_problem(pred, imgs, mask, patch_size, norm_pix_loss, pred_ids=None):
    return triton_problem(pred=pred, imgs=imgs) or _tile_problem(imgs.shape[1], patch_size)


patch_mse_loss_op.register("triton", _patch_mse_loss_triton, _triton_problem)
