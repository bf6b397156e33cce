"""The MAE pretraining model: a drop-in for the authors' ``models_mae.py``.

Same constructor, factories, state_dict (keys, shapes, order), forward and numbers as the
reference; the memory-bound glue and the attention go through :mod:`mae_fast.ops`, which picks
the reference or a fused kernel by backend. Extras, all off by default:

- ``backend=``: ``None`` (follow :func:`mae_fast.use_backend` / ``MAE_FAST_BACKEND``), ``"auto"``,
  ``"torch"``, ``"triton"``, ``"cuda"``;
- ``encoder_mask_tokens=True``: the paper's ablation, the encoder sees all ``L`` tokens with a
  learned mask token at removed positions; adds the key ``encoder_mask_token``;
- ``forward(..., noise=)``: a caller-chosen mask (small noise is kept, as in the reference);
- ``pred_masked_only=True``: ``decoder_pred`` runs on the removed patches only (the loss needs no
  other), and ``forward`` returns ``pred (N, L-K, P*P*C)`` for them, in ``argsort(noise)`` order.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from . import ops
from .layers import Block, PatchEmbed
from .ops._backend import check_backend_name
from .pos_embed import sincos_2d


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a VisionTransformer backbone."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3,
                 embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4., norm_layer=nn.LayerNorm, norm_pix_loss=False,
                 *, backend: str | None = None, encoder_mask_tokens: bool = False,
                 pred_masked_only: bool = False):
        super().__init__()
        # Construction order follows the reference, so the same seed draws the same weights.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.in_chans = in_chans
        self.encoder_mask_tokens = encoder_mask_tokens
        self.pred_masked_only = pred_masked_only
        if encoder_mask_tokens:
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.backend = backend
        self.initialize_weights()

    # ------------------------------------------------------------------ set-up
    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        if name is not None:
            check_backend_name(name)
        self._backend = name
        for blk in (*self.blocks, *self.decoder_blocks):
            blk.attn.backend = name

    def initialize_weights(self):
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid, cls_token=True).float().unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            sincos_2d(self.decoder_pos_embed.shape[-1], grid, cls_token=True).float().unsqueeze(0))

        # Initialise patch_embed like nn.Linear (instead of nn.Conv2d).
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        torch.nn.init.normal_(self.cls_token, std=.02)
        torch.nn.init.normal_(self.mask_token, std=.02)
        self.apply(self._init_weights)
        if self.encoder_mask_tokens:
            torch.nn.init.normal_(self.encoder_mask_token, std=.02)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    # ------------------------------------------------------------------ pixels <-> patches
    def patchify(self, imgs):
        """imgs: (N, C, H, W) -> x: (N, L, patch_size**2 * C)"""
        return ops.patchify(imgs, self.patch_size)

    def unpatchify(self, x):
        """x: (N, L, patch_size**2 * C) -> imgs: (N, C, H, W)"""
        return ops.unpatchify(x, self.patch_size, self.in_chans)

    # ------------------------------------------------------------------ masking
    def masking_ids(self, N: int, L: int, mask_ratio: float, device, noise=None):
        """``(ids_keep (N, K), ids_restore (N, L), mask (N, L))`` exactly as the reference's
        ``random_masking`` draws them: ``noise = torch.rand(N, L)`` unless given, ascending argsort,
        small noise is kept."""
        len_keep = self._len_keep(L, mask_ratio)
        if noise is None:
            noise = torch.rand(N, L, device=device)  # noise in [0, 1]
        else:
            _check_noise(noise, N, L, device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        mask = torch.ones([N, L], device=device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return ids_keep, ids_restore, mask

    def random_masking(self, x, mask_ratio, noise=None):
        """Per-sample random masking by per-sample shuffling.
        x: [N, L, D] -> (x_masked [N, K, D], mask [N, L], ids_restore [N, L])"""
        N, L, D = x.shape
        ids_keep, ids_restore, mask = self.masking_ids(N, L, mask_ratio, x.device, noise)
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        return x_masked, mask, ids_restore

    @staticmethod
    def _len_keep(L: int, mask_ratio) -> int:
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
        len_keep = int(L * (1 - ratio))
        if len_keep < 1:
            raise ValueError(f"mask_ratio={mask_ratio} keeps no patch of L={L} (int(L * (1 - mask_ratio)) == 0)")
        return len_keep

    def _check_loss_ratio(self, mask_ratio) -> int:
        len_keep = self._len_keep(self.num_patches, mask_ratio)
        if len_keep == self.num_patches:
            raise ValueError(
                f"mask_ratio={mask_ratio} removes no patch of L={self.num_patches}: the loss would be 0/0 "
                f"(the reference returns NaN); use a ratio > 0, or forward_encoder alone for features")
        return len_keep

    # ------------------------------------------------------------------ encoder / decoder / loss
    def forward_encoder(self, x, mask_ratio, noise=None):
        """imgs (N, C, H, W) -> (latent (N, 1+K, D), mask (N, L), ids_restore (N, L)); with
        ``encoder_mask_tokens`` the latent holds all ``1+L`` tokens."""
        self._check_imgs(x)
        ids_keep, ids_restore, mask = self.masking_ids(x.shape[0], self.num_patches, mask_ratio, x.device, noise)
        x = self.embed(x, ids_keep, mask)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def embed(self, imgs, ids_keep, mask):
        """The encoder's input: cls + the kept patches' embeddings with their positions (or,
        with ``encoder_mask_tokens``, every patch, removed ones replaced by the mask token)."""
        if not self.encoder_mask_tokens and self.plain_patch_embed():
            w, b = self.patch_embed.proj.weight, self.patch_embed.proj.bias
            return ops.embed_visible_patches(imgs, ids_keep, w, b, self.pos_embed, self.cls_token,
                                             backend=self.backend)
        x = self.patch_embed(imgs)
        if self.encoder_mask_tokens:
            x = torch.where(mask.unsqueeze(-1).bool(), self.encoder_mask_token.to(x.dtype), x)
        x = x + self.pos_embed[:, 1:, :]
        if not self.encoder_mask_tokens:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1)

    def plain_patch_embed(self) -> bool:
        """Whether the fused embedding may read ``patch_embed.proj``'s weights directly: a plain
        Conv2d with no hooks. A swapped-in module (LoRA, quantised) or a hook (feature taps) gets
        ``self.patch_embed(imgs)`` called, as in the reference."""
        pe, proj = self.patch_embed, self.patch_embed.proj
        return (type(proj) is nn.Conv2d and type(pe) is PatchEmbed
                and not (pe._forward_hooks or pe._forward_pre_hooks or proj._forward_hooks or proj._forward_pre_hooks))

    def forward_decoder(self, x, ids_restore, pred_ids=None):
        """latent (N, 1+K, D) -> pred (N, L, P*P*C), or (N, M, P*P*C) for the patches ``pred_ids (N, M)``"""
        x = self.decoder_input(x, ids_restore)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.head(x, pred_ids)

    def decoder_input(self, latent, ids_restore):
        """decoder_embed, then mask tokens at removed positions, patch order, + decoder_pos_embed."""
        x = self.decoder_embed(latent)
        if self.encoder_mask_tokens:
            return x + self.decoder_pos_embed  # every token is already there, in patch order
        return ops.unshuffle_mask_tokens(x, ids_restore, self.mask_token, self.decoder_pos_embed,
                                         backend=self.backend)

    def head(self, x, pred_ids=None):
        """decoder_norm, decoder_pred, cls row dropped: (N, 1+L, d) -> (N, L, P*P*C); only the
        patches ``pred_ids (N, M)`` when given (norm and Linear act per row, so rows can go first)."""
        if pred_ids is None:
            return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        x = torch.gather(x[:, 1:, :], 1, pred_ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, imgs, pred, mask):
        """imgs (N, C, H, W), pred (N, L, P*P*C), mask (N, L) with 1 = removed -> scalar loss"""
        return ops.patch_mse_loss(pred, imgs, mask, self.patch_size, self.norm_pix_loss, backend=self.backend)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        len_keep = self._check_loss_ratio(mask_ratio)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        if self.pred_masked_only:
            ids_removed = torch.argsort(ids_restore, dim=1)[:, len_keep:]
            pred = self.forward_decoder(latent, ids_restore, ids_removed)  # [N, L-K, p*p*C]
            loss = ops.patch_mse_loss(pred, imgs, mask, self.patch_size, self.norm_pix_loss, pred_ids=ids_removed,
                                      backend=self.backend)
            return loss, pred, mask
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p*p*C]
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    # ------------------------------------------------------------------ input checks
    def _check_imgs(self, imgs) -> None:
        if not isinstance(imgs, torch.Tensor):
            raise TypeError(f"imgs must be a torch.Tensor, got {type(imgs).__name__}")
        if imgs.dim() != 4:
            raise ValueError(f"imgs must be 4-D (N, C, H, W), got shape {tuple(imgs.shape)}")
        if not imgs.is_floating_point():
            raise TypeError(f"imgs must be a floating-point tensor (normalised pixels), got {imgs.dtype}; "
                            f"convert with imgs.float() and normalise first")
        N, C, H, W = imgs.shape
        if C != self.in_chans:
            raise ValueError(f"imgs must have in_chans={self.in_chans} channels, got {C} (shape {tuple(imgs.shape)})")
        if (H, W) != self.patch_embed.img_size:
            p = self.patch_size
            hint = "" if H % p == 0 and W % p == 0 else f", and {H}x{W} is not divisible by patch_size={p}"
            raise ValueError(f"imgs must be {self.patch_embed.img_size[0]}x{self.patch_embed.img_size[1]} "
                             f"(the model's img_size), got {H}x{W}{hint}")
        if N == 0:
            raise ValueError("imgs must hold at least one image, got N=0")


def _check_noise(noise, N: int, L: int, device) -> None:
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor of shape ({N}, {L}), got {type(noise).__name__}")
    if tuple(noise.shape) != (N, L):
        raise ValueError(f"noise must have shape (N, L) = ({N}, {L}), got {tuple(noise.shape)}")
    if noise.device != torch.device(device):
        raise ValueError(f"noise must be on the images' device {device}, got {noise.device}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")


def mae_vit_base_patch16_dec512d8b(**kwargs):
    return MaskedAutoencoderViT(
        patch_size=16, embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def mae_vit_large_patch16_dec512d8b(**kwargs):
    return MaskedAutoencoderViT(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def mae_vit_huge_patch14_dec512d8b(**kwargs):
    return MaskedAutoencoderViT(
        patch_size=14, embed_dim=1280, depth=32, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


# set recommended archs
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b  # decoder: 512 dim, 8 blocks
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b  # decoder: 512 dim, 8 blocks
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b  # decoder: 512 dim, 8 blocks


# Small configurations of ours (not the authors'), for CPUs, tests and the demo.
def mae_vit_tiny_patch16(**kwargs):
    """ViT-Tiny sized encoder (192 x 12, 3 heads) with a 128 x 4 decoder."""
    return MaskedAutoencoderViT(
        patch_size=16, embed_dim=192, depth=12, num_heads=3,
        decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def mae_vit_demo_patch8(**kwargs):
    """A ~1M-parameter MAE for 64 px images (8 px patches): the CPU demo."""
    kwargs.setdefault("img_size", 64)
    return MaskedAutoencoderViT(
        patch_size=8, embed_dim=128, depth=4, num_heads=4,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


# The one model registry: the authors' factory names and ours, for every tool that takes --model.
MODELS = {f.__name__: f for f in (
    mae_vit_base_patch16_dec512d8b, mae_vit_large_patch16_dec512d8b, mae_vit_huge_patch14_dec512d8b,
    mae_vit_tiny_patch16, mae_vit_demo_patch8)}
MODELS.update(mae_vit_base_patch16=mae_vit_base_patch16, mae_vit_large_patch16=mae_vit_large_patch16,
              mae_vit_huge_patch14=mae_vit_huge_patch14)


def create_model(name: str, **kwargs) -> MaskedAutoencoderViT:
    """``MODELS[name](**kwargs)``, with a clear error for an unknown name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)
