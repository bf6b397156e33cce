"""Fixed 2-D sin-cos position embeddings, as in the authors' ``util/pos_embed.py``.

Computed in float64 (the reference uses numpy float64; ``np.float`` is gone from numpy >= 1.24,
so we use torch). The first half of the channels encodes the column (w) index, the second half
the row (h) index; a zero row is prepended for the cls token.
"""
from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``pos (M,)`` -> ``(M, embed_dim)``: ``[sin(pos * omega), cos(pos * omega)]``."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for a sin-cos embedding, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """``(grid_h * grid_w [+1], embed_dim)`` float64 table; rows in raster (h, w) order."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for a 2-D sin-cos embedding, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb
