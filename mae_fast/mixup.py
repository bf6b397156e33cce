"""Mixup and CutMix with timm's semantics (``timm.data.Mixup``, mode ``"batch"``), without timm.

One draw per batch: with both alphas > 0, CutMix is chosen with probability ``switch_prob`` (0.5),
else Mixup; ``lam`` comes from ``Beta(alpha, alpha)`` of the chosen one and is applied with
probability ``prob`` (1.0). The batch is mixed with itself flipped (``x.flip(0)``); CutMix pastes
one random box (``sqrt(1 - lam)`` of each side, centre uniform, clipped to the image) and then
sets ``lam`` to the area actually kept (timm's ``correct_lam``). Targets are soft: label smoothing
folded in as timm's ``mixup_target`` (``off = smoothing / classes``, ``on = 1 - smoothing + off``),
then ``lam * y + (1 - lam) * y.flip(0)``. Draws come from numpy's global RNG, as timm's.

Train on the soft targets with :func:`soft_target_cross_entropy` (timm's ``SoftTargetCrossEntropy``).
"""
from __future__ import annotations

import numpy as np
import torch


def one_hot(target: torch.Tensor, num_classes: int, on_value: float = 1.0, off_value: float = 0.0) -> torch.Tensor:
    return torch.full((target.shape[0], num_classes), off_value, device=target.device).scatter_(
        1, target.long().view(-1, 1), on_value)


def mixup_target(target: torch.Tensor, num_classes: int, lam: float = 1.0, smoothing: float = 0.0) -> torch.Tensor:
    """timm's ``mixup_target``: smoothed one-hot targets of the batch and of its flip, mixed by ``lam``."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = one_hot(target, num_classes, on, off)
    y2 = one_hot(target.flip(0), num_classes, on, off)
    return y1 * lam + y2 * (1.0 - lam)


def rand_bbox(img_shape, lam: float) -> tuple[int, int, int, int]:
    """timm's ``rand_bbox`` (no margin, one box): ``(y_lo, y_hi, x_lo, x_hi)`` covering about
    ``1 - lam`` of the image."""
    ratio = np.sqrt(1 - lam)
    img_h, img_w = img_shape[-2:]
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    cy = np.random.randint(0, img_h)
    cx = np.random.randint(0, img_w)
    yl = int(np.clip(cy - cut_h // 2, 0, img_h))
    yh = int(np.clip(cy + cut_h // 2, 0, img_h))
    xl = int(np.clip(cx - cut_w // 2, 0, img_w))
    xh = int(np.clip(cx + cut_w // 2, 0, img_w))
    return yl, yh, xl, xh


def cutmix_bbox_and_lam(img_shape, lam: float) -> tuple[tuple[int, int, int, int], float]:
    """The box and the corrected ``lam``: one minus the box's share of the image."""
    yl, yh, xl, xh = rand_bbox(img_shape, lam)
    lam = 1.0 - (yh - yl) * (xh - xl) / float(img_shape[-2] * img_shape[-1])
    return (yl, yh, xl, xh), lam


class Mixup:
    """``Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000)`` as the
    authors' fine-tuning; ``x, soft_targets = mixup(x, target)`` mixes ``x`` in place."""

    def __init__(self, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, num_classes: int = 1000):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup and cutmix alphas must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
        if not (mixup_alpha > 0 or cutmix_alpha > 0):
            raise ValueError("Mixup needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.mix_prob, self.switch_prob = prob, switch_prob
        self.label_smoothing, self.num_classes = label_smoothing, num_classes

    def params(self) -> tuple[float, bool]:
        """timm's ``_params_per_batch``: ``(lam, use_cutmix)``."""
        lam, use_cutmix = 1.0, False
        if np.random.rand() < self.mix_prob:
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                use_cutmix = np.random.rand() < self.switch_prob
                alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
                lam = float(np.random.beta(alpha, alpha))
            elif self.mixup_alpha > 0:
                lam = float(np.random.beta(self.mixup_alpha, self.mixup_alpha))
            else:
                use_cutmix = True
                lam = float(np.random.beta(self.cutmix_alpha, self.cutmix_alpha))
        return lam, use_cutmix

    def mix_batch(self, x: torch.Tensor) -> float:
        lam, use_cutmix = self.params()
        if lam == 1.0:
            return 1.0
        if use_cutmix:
            (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(x.shape, lam)
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
        else:
            x_flipped = x.flip(0).mul_(1.0 - lam)
            x.mul_(lam).add_(x_flipped)
        return lam

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) % 2:
            raise ValueError(f"Mixup needs an even batch size, got {len(x)}")
        lam = self.mix_batch(x)
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """timm's ``SoftTargetCrossEntropy``: ``mean(sum(-target * log_softmax(logits)))``."""
    return torch.sum(-target * torch.log_softmax(logits, dim=-1), dim=-1).mean()
