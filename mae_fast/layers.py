"""The ViT building blocks of MAE, without timm.

Same parameter names, shapes and construction order (hence the same random init under a seed)
as timm 0.3.2's ``PatchEmbed`` and ``Block``, which the authors' model uses. Attention runs
through :func:`mae_fast.ops.attention`, which picks SDPA, or the CUDA extension, by backend.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import ops


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


class PatchEmbed(nn.Module):
    """Image to patch embedding: a ``P x P`` conv with stride ``P``."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"patch_size must be square, got {self.patch_size}")
        for side, p in zip(self.img_size, self.patch_size):
            if side % p:
                raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {p}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, L, D)


def is_plain_patch_embed(pe: nn.Module) -> bool:
    """Whether a fused op may read ``pe.proj``'s weights instead of calling ``pe``: a plain
    PatchEmbed and Conv2d with no hooks. A swapped-in module (LoRA, quantised) or a hook (feature
    taps) must see the call, as in the reference."""
    proj = getattr(pe, "proj", None)
    return (type(pe) is PatchEmbed and type(proj) is nn.Conv2d
            and not (pe._forward_hooks or pe._forward_pre_hooks or proj._forward_hooks or proj._forward_pre_hooks))


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, backend: str | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # A view, not a permute: the fused op reads q, k, v straight from the packed layout.
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        return self.proj(ops.attention(qkv, backend=self.backend))


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, norm_layer=nn.LayerNorm,
                 backend: str | None = None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, backend=backend)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
