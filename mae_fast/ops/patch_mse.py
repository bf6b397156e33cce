"""MAE's loss: MSE per patch against (optionally per-patch normalised) pixels, mean over the
removed patches."""
from __future__ import annotations

from typing import Optional

import torch

from ._backend import Op
from ._triton import (
    HAS_TRITON,
    check_float,
    check_ids,
    check_ids_enabled,
    check_same_device,
    check_tensor,
    check_triton_dtypes,
    host_check_ids,
    next_pow2,
    tl,
    triton,
    why_not_triton,
)
from .patches import patchify

NORM_PIX_EPS = 1e-6
_MAX_PATCH_VALUES = 32768  # P*P*C handled by one program of the Triton kernels


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


def _check_args(pred, imgs, mask, patch_size, norm_pix_loss, pred_ids) -> None:
    check_tensor(pred, "pred", 3)
    check_tensor(imgs, "imgs", 4)
    check_tensor(mask, "mask", 2)
    check_float(pred, "pred")
    check_float(imgs, "imgs")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise TypeError(f"mask must be a float or bool tensor, got {mask.dtype}")
    check_same_device(pred, "pred", imgs=imgs, mask=mask)
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if not isinstance(norm_pix_loss, bool):
        raise TypeError(f"norm_pix_loss must be a bool, got {type(norm_pix_loss).__name__}")
    N, C, H, W = imgs.shape
    P = patch_size
    if H % P or W % P:
        raise ValueError(f"imgs height and width must be multiples of patch_size={P}, got H={H}, W={W}")
    L = (H // P) * (W // P)
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


def patch_mse_loss(pred, imgs, mask, patch_size, norm_pix_loss=False, *, pred_ids=None, backend=None):
    """MAE's loss: ``pred (N, L, P*P*C)`` in (p, q, c) pixel order, ``imgs (N, C, H, W)``,
    ``mask (N, L)`` (1 = removed), per-patch normalised target if ``norm_pix_loss`` (unbiased
    variance, eps 1e-6); mean per patch, then ``(loss * mask).sum() / mask.sum()``.

    ``pred_ids (N, M)`` int64 (optional): ``pred (N, M, P*P*C)`` holds only the patches
    ``pred_ids[n, m]`` (e.g. the removed ones, ``ids_shuffle[:, K:]``). With ``MAE_FAST_CHECK_IDS=1``
    they are checked on the host (in range, no repeat: a device sync and a sort).

    The triton backend gives the same bits on every run (per-patch losses in a buffer, then a
    fixed-order sum). Its gradient w.r.t. ``mask`` is not computed at ``mask == 0`` patches unless
    ``mask.requires_grad`` (then no patch is skipped). Skipping kept patches has one visible
    difference: a NaN/inf in a kept patch's prediction does not reach the loss (the reference's
    ``loss * mask`` turns it into NaN); a NaN in a removed patch does, as in the reference.
    Ids outside ``[0, L)`` (without the debug check) read no memory: their patches weigh 0."""
    _check_args(pred, imgs, mask, patch_size, norm_pix_loss, pred_ids)
    if pred_ids is not None and check_ids_enabled():
        N, C, H, W = imgs.shape
        host_check_ids(pred_ids, "pred_ids", (H // patch_size) * (W // patch_size), unique=True)
    return patch_mse_loss_op(pred, imgs, mask, patch_size, norm_pix_loss, pred_ids, backend=backend,
                             device=pred.device)


# ============================================================================ Triton kernels

if HAS_TRITON:

    @triton.jit
    def _row_patch(ids_ptr, M, L, s_idn, s_idm, BLOCK: tl.constexpr, HAS_IDS: tl.constexpr):
        """This program's row of ``(N, M)``: ``(row, n, m, l, id_ok)`` with ``l`` the patch id
        (``ids[n, m]`` if HAS_IDS, else ``m``) and ``id_ok`` a ``[BLOCK]`` mask, False when ``l``
        is outside ``[0, L)`` (then no pixel is read)."""
        row = tl.program_id(0).to(tl.int64)
        n = row // M
        mi = row % M
        if HAS_IDS:
            l = tl.load(ids_ptr + n * s_idn + mi * s_idm).to(tl.int64)
        else:
            l = mi
        lv = tl.zeros([BLOCK], dtype=tl.int64) + l
        return row, n, mi, l, (lv >= 0) & (lv < L)

    @triton.jit
    def _patch_target(img_ptr, n, l, j, active, WP, s_in, s_ic, s_ih, s_iw, PPC,
                      P: tl.constexpr, C: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr):
        """The target pixels ``j`` (order (p, q, c)) of patch ``l`` of image ``n``, read from NCHW,
        normalised per patch if NORM (unbiased variance). fp32."""
        hi = l // WP
        wi = l % WP
        p = j // (P * C)
        q = (j // C) % P
        c = (j % C).to(tl.int64)
        off = n * s_in + c * s_ic + (hi * P + p) * s_ih + (wi * P + q) * s_iw
        t = tl.load(img_ptr + off, mask=active, other=0.0).to(tl.float32)
        if NORM:
            mean = tl.sum(t, axis=0) / PPC
            diff = tl.where(active, t - mean, 0.0)
            var = tl.sum(diff * diff, axis=0) / (PPC - 1)
            t = tl.div_rn(diff, tl.sqrt_rn(var + EPS))
        return t

    @triton.jit
    def _patch_mse_fwd_kernel(
        pred_ptr, img_ptr, w_ptr, ids_ptr, loss_ptr,
        M, PPC, WP, L,
        s_pn, s_pm, s_pj,
        s_in, s_ic, s_ih, s_iw,
        s_wn, s_wm,
        s_idn, s_idm,
        P: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr,
        NORM: tl.constexpr, EPS: tl.constexpr, HAS_IDS: tl.constexpr, SKIP_ZERO: tl.constexpr,
    ):
        """Per-patch MSE ``loss[n, m] = mean_j (pred[n, m, j] - target[n, l, j])**2``,
        ``l = ids[n, m]`` (HAS_IDS) or ``m``; 0 without reading anything where ``w[n, m] == 0``
        (SKIP_ZERO: the kept patches).

        ``pred (N, M, P*P*C)`` any strides, (p, q, c) order; ``img (N, C, H, W)`` any strides;
        ``w (N, M)`` float (the mask at the predicted patches); ``ids (N, M)`` int64; ``loss (N, M)``
        fp32 contiguous. Grid ``(N*M,)``. Bytes: read pred and imgs of the weighted patches once
        (``2 * N*M_removed*P*P*C`` elements), write ``N*M`` fp32.
        """
        row, n, mi, l, id_ok = _row_patch(ids_ptr, M, L, s_idn, s_idm, BLOCK, HAS_IDS)
        w = tl.load(w_ptr + n * s_wn + mi * s_wm).to(tl.float32)
        j = tl.arange(0, BLOCK)
        active = (j < PPC) & id_ok
        if SKIP_ZERO:
            wv = tl.zeros([BLOCK], dtype=tl.float32) + w
            active = active & (wv != 0.0)
        t = _patch_target(img_ptr, n, l, j, active, WP, s_in, s_ic, s_ih, s_iw, PPC, P, C, NORM, EPS)
        x = tl.load(pred_ptr + n * s_pn + mi * s_pm + j.to(tl.int64) * s_pj, mask=active, other=0.0)
        e = tl.where(active, x.to(tl.float32) - t, 0.0)
        tl.store(loss_ptr + row, tl.sum(e * e, axis=0) / PPC)

    @triton.jit
    def _patch_mse_bwd_kernel(
        pred_ptr, img_ptr, g_ptr, ids_ptr, dpred_ptr,
        M, PPC, WP, L,
        s_pn, s_pm, s_pj,
        s_in, s_ic, s_ih, s_iw,
        s_gn, s_gm,
        s_idn, s_idm,
        P: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr,
        NORM: tl.constexpr, EPS: tl.constexpr, HAS_IDS: tl.constexpr,
    ):
        """``dpred[n, m, j] = g[n, m] * 2 * (pred - target) / (P*P*C)``; rows with ``g == 0`` (the
        kept patches) are written as zeros without reading pred or imgs.

        ``g (N, M)`` fp32, any strides (an expanded scalar is fine); ``dpred (N, M, P*P*C)``
        contiguous, pred's dtype. Grid ``(N*M,)``. Bytes: read pred and imgs of the removed patches,
        write all of dpred.
        """
        row, n, mi, l, id_ok = _row_patch(ids_ptr, M, L, s_idn, s_idm, BLOCK, HAS_IDS)
        g = tl.load(g_ptr + n * s_gn + mi * s_gm).to(tl.float32)
        j = tl.arange(0, BLOCK)
        in_row = j < PPC
        gv = tl.zeros([BLOCK], dtype=tl.float32) + g
        active = in_row & (gv != 0.0) & id_ok
        t = _patch_target(img_ptr, n, l, j, active, WP, s_in, s_ic, s_ih, s_iw, PPC, P, C, NORM, EPS)
        x = tl.load(pred_ptr + n * s_pn + mi * s_pm + j.to(tl.int64) * s_pj, mask=active, other=0.0)
        dx = tl.where(active, (x.to(tl.float32) - t) * (2.0 * g / PPC), 0.0)
        tl.store(dpred_ptr + row * PPC + j, dx.to(dpred_ptr.dtype.element_ty), mask=in_row)


def _launch_args(pred, imgs, patch_size):
    N, C, H, W = imgs.shape
    PPC = patch_size * patch_size * C
    if PPC > _MAX_PATCH_VALUES:
        raise ValueError(f"the triton patch_mse_loss handles P*P*C <= {_MAX_PATCH_VALUES}, got {PPC}")
    BLOCK = next_pow2(max(PPC, 16))
    warps = 4 if BLOCK <= 1024 else 8
    return PPC, BLOCK, warps


def _num_patches(imgs: torch.Tensor, patch_size: int) -> int:
    return (imgs.shape[2] // patch_size) * (imgs.shape[3] // patch_size)


@torch.library.custom_op("mae_fast::patch_mse_per_patch", mutates_args=())
def _patch_loss_cop(pred: torch.Tensor, imgs: torch.Tensor, weight: torch.Tensor, pred_ids: Optional[torch.Tensor],
                    patch_size: int, norm_pix_loss: bool, skip_zero: bool) -> torch.Tensor:
    """Per-patch MSE ``(N, M)`` fp32 (0 where skipped)."""
    N, M, _ = pred.shape
    PPC, BLOCK, warps = _launch_args(pred, imgs, patch_size)
    loss = torch.empty((N, M), dtype=torch.float32, device=pred.device)
    if loss.numel():
        ids = pred_ids if pred_ids is not None else weight  # a dummy pointer when HAS_IDS=False
        _patch_mse_fwd_kernel[(N * M,)](
            pred, imgs, weight, ids, loss, M, PPC, imgs.shape[3] // patch_size, _num_patches(imgs, patch_size),
            *pred.stride(), *imgs.stride(), *weight.stride(), *ids.stride(),
            P=patch_size, C=imgs.shape[1], BLOCK=BLOCK, NORM=norm_pix_loss, EPS=NORM_PIX_EPS,
            HAS_IDS=pred_ids is not None, SKIP_ZERO=skip_zero, num_warps=warps,
        )
    return loss


@_patch_loss_cop.register_fake
def _(pred, imgs, weight, pred_ids, patch_size, norm_pix_loss, skip_zero):
    return pred.new_empty(pred.shape[:2], dtype=torch.float32)


@torch.library.custom_op("mae_fast::patch_mse_per_patch_backward", mutates_args=())
def _patch_loss_bwd_cop(grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, pred_ids: Optional[torch.Tensor],
                        patch_size: int, norm_pix_loss: bool) -> torch.Tensor:
    N, M, _ = pred.shape
    PPC, BLOCK, warps = _launch_args(pred, imgs, patch_size)
    dpred = torch.empty((N, M, PPC), dtype=pred.dtype, device=pred.device)
    if dpred.numel():
        ids = pred_ids if pred_ids is not None else grad
        _patch_mse_bwd_kernel[(N * M,)](
            pred, imgs, grad, ids, dpred, M, PPC, imgs.shape[3] // patch_size, _num_patches(imgs, patch_size),
            *pred.stride(), *imgs.stride(), *grad.stride(), *ids.stride(),
            P=patch_size, C=imgs.shape[1], BLOCK=BLOCK, NORM=norm_pix_loss, EPS=NORM_PIX_EPS,
            HAS_IDS=pred_ids is not None, num_warps=warps,
        )
    return dpred


@_patch_loss_bwd_cop.register_fake
def _(grad, pred, imgs, pred_ids, patch_size, norm_pix_loss):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    pred, imgs, weight, pred_ids, patch_size, norm_pix_loss, skip_zero = inputs
    ctx.save_for_backward(pred, imgs, pred_ids)
    ctx.patch_size = patch_size
    ctx.norm_pix_loss = norm_pix_loss


def _imgs_grad(grad, pred, imgs, pred_ids, P, norm):
    """d loss / d imgs in torch (an unusual need: only when imgs requires grad). ``grad (N, M)``."""
    N, C, H, W = imgs.shape
    h, w = H // P, W // P
    u = patchify(imgs.float(), P)  # (N, L, PPC)
    if pred_ids is not None:
        u = torch.gather(u, 1, pred_ids.unsqueeze(-1).expand(-1, -1, u.shape[-1]))
    n_pix = u.shape[-1]
    t = u
    if norm:
        mean = u.mean(dim=-1, keepdim=True)
        s = (u.var(dim=-1, keepdim=True) + NORM_PIX_EPS).sqrt()
        t = (u - mean) / s
    dt = -(2.0 / n_pix) * (pred.float() - t) * grad.float().unsqueeze(-1)
    if norm:
        # t = (u - mean) / s, s**2 = var + eps (unbiased): du = (dt - mean(dt) - t * sum(dt t)/(n-1)) / s
        dt = (dt - dt.mean(dim=-1, keepdim=True) - t * (dt * t).sum(dim=-1, keepdim=True) / (n_pix - 1)) / s
    if pred_ids is not None:
        full = dt.new_zeros((N, h * w, n_pix))
        full.scatter_(1, pred_ids.unsqueeze(-1).expand(-1, -1, n_pix), dt)  # ids distinct: no collision
        dt = full
    dimgs = dt.reshape(N, h, w, P, P, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, H, W)
    return dimgs.to(imgs.dtype)


def _backward(ctx, grad):
    pred, imgs, pred_ids = ctx.saved_tensors
    dpred = dimgs = None
    if ctx.needs_input_grad[0]:
        dpred = _patch_loss_bwd_cop(grad, pred, imgs, pred_ids, ctx.patch_size, ctx.norm_pix_loss)
    if ctx.needs_input_grad[1]:
        dimgs = _imgs_grad(grad, pred, imgs, pred_ids, ctx.patch_size, ctx.norm_pix_loss)
    # The weight's gradient is taken outside the op: loss = (per_patch * weight).sum() / mask.sum().
    return dpred, dimgs, None, None, None, None, None


_patch_loss_cop.register_autograd(_backward, setup_context=_setup)


def _patch_mse_loss_triton(pred, imgs, mask, patch_size, norm_pix_loss, pred_ids=None):
    """Per-patch losses (Triton, one read of pred and imgs at removed patches) then a fixed-order
    masked mean in torch (deterministic)."""
    check_triton_dtypes(pred=pred, imgs=imgs)
    out_dtype = torch.promote_types(pred.dtype, imgs.dtype)
    if mask.is_floating_point():
        out_dtype = torch.promote_types(out_dtype, mask.dtype)
    maskf = mask.to(torch.float32)
    if pred_ids is None:
        weight = maskf
    else:  # an id outside [0, L) weighs 0 (no out-of-bounds gather; MAE_FAST_CHECK_IDS=1 reports it)
        in_range = (pred_ids >= 0) & (pred_ids < maskf.shape[1])
        weight = torch.gather(maskf, 1, pred_ids.clamp(0, maskf.shape[1] - 1)) * in_range
    per_patch = _patch_loss_cop(pred, imgs, weight, pred_ids, patch_size, norm_pix_loss,
                                not mask.requires_grad)
    return ((per_patch * weight).sum() / maskf.sum()).to(out_dtype)


patch_mse_loss_op.register("triton", _patch_mse_loss_triton, why_not_triton)
