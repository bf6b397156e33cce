"""MAE's loss: MSE per patch against (optionally per-patch normalised) pixels, mean over the
removed patches."""
from __future__ import annotations

import torch

from ._backend import Op
from .patches import patchify

NORM_PIX_EPS = 1e-6


def patch_mse_loss_reference(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool
) -> torch.Tensor:
    """The authors' ``forward_loss``: ``pred (N, L, P*P*C)``, ``imgs (N, C, H, W)``, ``mask (N, L)``
    with 1 = removed. The variance is unbiased (torch's default), as in the reference. A mask with
    no removed patch gives 0/0 = NaN, as in the reference: the model rejects such ratios first."""
    target = patchify(imgs, patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


patch_mse_loss_op = Op("patch_mse_loss", patch_mse_loss_reference)


def patch_mse_loss(pred, imgs, mask, patch_size, norm_pix_loss=False, *, backend=None):
    return patch_mse_loss_op(pred, imgs, mask, patch_size, norm_pix_loss, backend=backend, device=pred.device)
