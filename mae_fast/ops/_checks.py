"""Argument checks shared by the ops' entry points: a clear ``TypeError``/``ValueError`` naming
the argument and what was expected, before any backend runs."""
from __future__ import annotations

import os

import torch

CHECK_IDS_ENV = "MAE_FAST_CHECK_IDS"


def check_tensor(t, name: str, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_float(t: torch.Tensor, name: str) -> None:
    """Any floating dtype (the torch reference also runs in float64)."""
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_ids(t: torch.Tensor, name: str) -> None:
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 (torch.long), got {t.dtype}")


def check_same_device(ref: torch.Tensor, ref_name: str, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def check_shape(t: torch.Tensor, name: str, expected: tuple) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_patch_grid(imgs: torch.Tensor, patch_size) -> int:
    """``patch_size`` a positive int that tiles ``imgs (N, C, H, W)``; returns L, the patches per image."""
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    H, W = imgs.shape[2], imgs.shape[3]
    if H % patch_size or W % patch_size:
        raise ValueError(f"imgs height and width must be multiples of patch_size={patch_size}, got H={H}, W={W}")
    return (H // patch_size) * (W // patch_size)


def debug_check_ids(ids: torch.Tensor, name: str, upper: int) -> None:
    """With ``MAE_FAST_CHECK_IDS=1``: every id in ``[0, upper)`` and no id twice in a row. Costs a
    device->host sync and a sort, so it is a debug mode; never while torch.compile traces (the
    check needs the values)."""
    if torch.compiler.is_compiling() or os.environ.get(CHECK_IDS_ENV, "0") in ("", "0"):
        return
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must hold ids in [0, {upper}), found values in [{lo}, {hi}]")
    if ids.shape[-1] > 1:
        s = ids.sort(dim=-1).values
        if bool((s[..., 1:] == s[..., :-1]).any()):
            raise ValueError(f"{name} must not repeat an id within a row")
