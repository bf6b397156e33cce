"""Embedding of the visible patches: the encoder's input ``(N, 1+K, D)``.

The reference (the authors' code) runs the patch-embedding conv over ALL ``L`` patches, adds
``pos_embed``, and then throws away the removed 75%. Patch embedding is a linear map of each patch,
so embedding only the kept patches computes the same thing with a quarter of the work.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import Op


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


def gather_patches(imgs, ids_keep, patch_size, *, backend=None):
    return gather_patches_op(imgs, ids_keep, patch_size, backend=backend, device=imgs.device)


def embed_visible_patches(imgs, ids_keep, weight, bias, pos_embed, cls_token, *, backend=None):
    return embed_visible_patches_op(
        imgs, ids_keep, weight, bias, pos_embed, cls_token, backend=backend, device=imgs.device
    )
