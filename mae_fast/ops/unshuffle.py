"""The decoder's input: un-shuffle the encoded tokens, with mask tokens at removed positions."""
from __future__ import annotations

import torch

from ._backend import Op


def unshuffle_mask_tokens_reference(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """``(N, 1+K, d)`` -> ``(N, 1+L, d)``, the authors' order: append ``L - K`` mask tokens after
    the patch tokens, reorder with ``ids_restore``, put cls back in front, add ``pos_embed``."""
    N, _, d = x.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.repeat(N, L + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, d))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + pos_embed


unshuffle_mask_tokens_op = Op("unshuffle_mask_tokens", unshuffle_mask_tokens_reference)


def unshuffle_mask_tokens(x, ids_restore, mask_token, pos_embed, *, backend=None):
    return unshuffle_mask_tokens_op(x, ids_restore, mask_token, pos_embed, backend=backend, device=x.device)
