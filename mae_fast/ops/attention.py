"""Multi-head self-attention on the packed output of a qkv Linear.

``qkv`` is the ``(B, N, 3*H*D)`` output of the qkv Linear viewed as ``(B, N, 3, H, D)``, with no
permute and no copy; the result is ``(B, N, H*D)``, ready for the proj Linear. Scale ``D**-0.5``,
no mask, no dropout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import Op


def attention_reference(qkv: torch.Tensor) -> torch.Tensor:
    """The timm ``Attention`` computation, with SDPA for the core."""
    B, N, _, H, D = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, N, H * D)


attention_op = Op("attention", attention_reference)


def check_qkv(qkv: torch.Tensor) -> None:
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (B, N, 3, H, D), got {tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise TypeError(f"qkv must be a floating-point tensor, got {qkv.dtype}")


def attention(qkv: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    check_qkv(qkv)
    return attention_op(qkv, backend=backend, device=qkv.device)
