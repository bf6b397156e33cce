"""The model's input checks: a clear ``TypeError``/``ValueError`` before any work, where the
authors' model would index out of bounds, broadcast silently or return a NaN loss."""
from __future__ import annotations

import torch


def len_keep(L: int, mask_ratio) -> int:
    """``int(L * (1 - mask_ratio))`` for a real ``mask_ratio`` in [0, 1) that keeps a patch.
    (Removing none is fine for the encoder, e.g. to extract features; ``forward`` refuses it.)"""
    if isinstance(mask_ratio, (str, bytes, bool)):
        raise TypeError(f"mask_ratio must be a real number in [0, 1), got {type(mask_ratio).__name__}")
    try:
        ratio = float(mask_ratio)  # also numpy and 0-d tensor scalars, as the reference takes
    except (TypeError, ValueError):
        raise TypeError(f"mask_ratio must be a real number in [0, 1), got {type(mask_ratio).__name__}") from None
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = int(L * (1 - ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch of L={L} (int(L * (1 - mask_ratio)) == 0)")
    return keep


def len_keep_for_loss(L: int, mask_ratio) -> int:
    """:func:`len_keep`, for a ratio that also removes a patch (the loss averages over those)."""
    keep = len_keep(L, mask_ratio)
    if keep == L:
        raise ValueError(
            f"mask_ratio={mask_ratio} removes no patch of L={L}: the loss would be 0/0 "
            f"(the reference returns NaN); use a ratio > 0, or forward_encoder alone for features")
    return keep


def check_imgs(imgs, in_chans: int, img_size: tuple[int, int], patch_size: int) -> None:
    if not isinstance(imgs, torch.Tensor):
        raise TypeError(f"imgs must be a torch.Tensor, got {type(imgs).__name__}")
    if imgs.dim() != 4:
        raise ValueError(f"imgs must be 4-D (N, C, H, W), got shape {tuple(imgs.shape)}")
    if not imgs.is_floating_point():
        raise TypeError(f"imgs must be a floating-point tensor (normalised pixels), got {imgs.dtype}; "
                        f"convert with imgs.float() and normalise first")
    N, C, H, W = imgs.shape
    if C != in_chans:
        raise ValueError(f"imgs must have in_chans={in_chans} channels, got {C} (shape {tuple(imgs.shape)})")
    if (H, W) != tuple(img_size):
        p = patch_size
        hint = "" if H % p == 0 and W % p == 0 else f", and {H}x{W} is not divisible by patch_size={p}"
        raise ValueError(f"imgs must be {img_size[0]}x{img_size[1]} (the model's img_size), got {H}x{W}{hint}")
    if N == 0:
        raise ValueError("imgs must hold at least one image, got N=0")


def check_noise(noise, N: int, L: int, device) -> None:
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor of shape ({N}, {L}), got {type(noise).__name__}")
    if tuple(noise.shape) != (N, L):
        raise ValueError(f"noise must have shape (N, L) = ({N}, {L}), got {tuple(noise.shape)}")
    if noise.device != torch.device(device):
        raise ValueError(f"noise must be on the images' device {device}, got {noise.device}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
