"""Patchify / unpatchify: the pixel layout of MAE's prediction target.

A patch's pixels are ordered (row p, col q, channel c), i.e. ``einsum('nchpwq->nhwpqc')``; the
patch-embedding conv sees (c, p, q) instead. ``C`` is taken from the tensors, not hard-coded.
"""
from __future__ import annotations

import math

import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(N, C, h*P, w*P) -> (N, h*w, P*P*C)``."""
    N, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, in_chans: int = 3) -> torch.Tensor:
    """``(N, L, P*P*C) -> (N, C, h*P, w*P)`` for a square grid ``h = w = sqrt(L)``."""
    p, C = patch_size, in_chans
    N, L, _ = x.shape
    h = w = math.isqrt(L)
    if h * w != L:
        raise ValueError(f"unpatchify needs a square number of patches, got L={L}")
    if x.shape[2] != p * p * C:
        raise ValueError(f"x must have P*P*C = {p * p * C} values per patch, got {x.shape[2]}")
    x = x.reshape(N, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, C, h * p, w * p)
