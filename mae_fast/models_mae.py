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
from .layers import Block, BlocksMixin, PatchEmbed, forward_blocks, is_plain_patch_embed
from .model_checks import check_imgs, check_noise, len_keep, len_keep_for_loss
from .pos_embed import sincos_2d


class MaskedAutoencoderViT(BlocksMixin, nn.Module):
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
        keep = len_keep(L, mask_ratio)
        if noise is None:
            noise = torch.rand(N, L, device=device)  # noise in [0, 1]
        else:
            check_noise(noise, N, L, device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        mask = torch.ones([N, L], device=device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return ids_keep, ids_restore, mask

    def random_masking(self, x, mask_ratio, noise=None):
        """Per-sample random masking by per-sample shuffling.
        x: [N, L, D] -> (x_masked [N, K, D], mask [N, L], ids_restore [N, L])"""
        N, L, D = x.shape
        ids_keep, ids_restore, mask = self.masking_ids(N, L, mask_ratio, x.device, noise)
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        return x_masked, mask, ids_restore

    # ------------------------------------------------------------------ encoder / decoder / loss
    def forward_encoder(self, x, mask_ratio, noise=None):
        """imgs (N, C, H, W) -> (latent (N, 1+K, D), mask (N, L), ids_restore (N, L)); with
        ``encoder_mask_tokens`` the latent holds all ``1+L`` tokens."""
        check_imgs(x, self.in_chans, self.patch_embed.img_size, self.patch_size)
        ids_keep, ids_restore, mask = self.masking_ids(x.shape[0], self.num_patches, mask_ratio, x.device, noise)
        x = forward_blocks(self.blocks, self.embed(x, ids_keep, mask), self.norm)
        return x, mask, ids_restore

    def embed(self, imgs, ids_keep, mask):
        """The encoder's input: cls + the kept patches' embeddings with their positions (or,
        with ``encoder_mask_tokens``, every patch, removed ones replaced by the mask token)."""
        if self.encoder_mask_tokens:
            x = self.patch_embed(imgs)
            x = torch.where(mask.unsqueeze(-1).bool(), self.encoder_mask_token.to(x.dtype), x)
            return self._with_cls(x + self.pos_embed[:, 1:, :])
        if self.plain_patch_embed():
            w, b = self.patch_embed.proj.weight, self.patch_embed.proj.bias
            return ops.embed_visible_patches(imgs, ids_keep, w, b, self.pos_embed, self.cls_token,
                                             backend=self.backend)
        # a module that must be called (hooks, a swapped-in conv): the authors' order
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        return self._with_cls(torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])))

    def _with_cls(self, x):
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1)

    def plain_patch_embed(self) -> bool:
        """Whether the fused embedding may read ``patch_embed.proj``'s weights directly."""
        return is_plain_patch_embed(self.patch_embed)

    def forward_decoder(self, x, ids_restore, pred_ids=None):
        """latent (N, 1+K, D) -> pred (N, L, P*P*C), or (N, M, P*P*C) for the patches ``pred_ids (N, M)``"""
        x = forward_blocks(self.decoder_blocks, self.decoder_input(x, ids_restore), self.decoder_norm)
        return self.predict(x, pred_ids)

    def decoder_input(self, latent, ids_restore):
        """decoder_embed, then mask tokens at removed positions, patch order, + decoder_pos_embed."""
        x = self.decoder_embed(latent)
        if self.encoder_mask_tokens:
            return x + self.decoder_pos_embed  # every token is already there, in patch order
        return ops.unshuffle_mask_tokens(x, ids_restore, self.mask_token, self.decoder_pos_embed,
                                         backend=self.backend)

    def head(self, x, pred_ids=None):
        """decoder_norm, then :meth:`predict`: (N, 1+L, d) -> (N, L, P*P*C)."""
        return self.predict(self.decoder_norm(x), pred_ids)

    def predict(self, x, pred_ids=None):
        """decoder_pred on the normed decoder tokens, cls row dropped; only the patches
        ``pred_ids (N, M)`` when given (a Linear acts per row, so rows can go first)."""
        if pred_ids is None:
            return self.decoder_pred(x)[:, 1:, :]
        x = torch.gather(x[:, 1:, :], 1, pred_ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.decoder_pred(x)

    def forward_loss(self, imgs, pred, mask, pred_ids=None):
        """imgs (N, C, H, W), pred (N, L, P*P*C) (or (N, M, P*P*C) for the patches ``pred_ids``),
        mask (N, L) with 1 = removed -> scalar loss"""
        return ops.patch_mse_loss(pred, imgs, mask, self.patch_size, self.norm_pix_loss, pred_ids=pred_ids,
                                  backend=self.backend)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        keep = len_keep_for_loss(self.num_patches, mask_ratio)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        # pred_masked_only: the removed patches, the only ones the loss reads
        pred_ids = torch.argsort(ids_restore, dim=1)[:, keep:] if self.pred_masked_only else None
        pred = self.forward_decoder(latent, ids_restore, pred_ids)  # [N, L or L-K, p*p*C]
        loss = self.forward_loss(imgs, pred, mask, pred_ids)
        return loss, pred, mask


def _build(kwargs: dict, **config) -> MaskedAutoencoderViT:
    """The factory's ``config``, any of it overridden by the caller's ``kwargs`` (a decoder
    ablation asks ``create_model(name, decoder_depth=4)``); with no override, the authors' call."""
    return MaskedAutoencoderViT(**{**config, **kwargs})


def mae_vit_base_patch16_dec512d8b(**kwargs):
    return _build(kwargs,
        patch_size=16, embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6))


def mae_vit_large_patch16_dec512d8b(**kwargs):
    return _build(kwargs,
        patch_size=16, embed_dim=1024, depth=24, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6))


def mae_vit_huge_patch14_dec512d8b(**kwargs):
    return _build(kwargs,
        patch_size=14, embed_dim=1280, depth=32, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6))


# set recommended archs
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b  # decoder: 512 dim, 8 blocks
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b  # decoder: 512 dim, 8 blocks
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b  # decoder: 512 dim, 8 blocks


# Small configurations of ours (not the authors'), for CPUs, tests and the demo.
def mae_vit_tiny_patch16(**kwargs):
    """ViT-Tiny sized encoder (192 x 12, 3 heads) with a 128 x 4 decoder."""
    return _build(kwargs,
        patch_size=16, embed_dim=192, depth=12, num_heads=3,
        decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6))


def mae_vit_demo_patch8(**kwargs):
    """A ~1M-parameter MAE for 64 px images (8 px patches): the CPU demo."""
    return _build(kwargs,
        img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6))


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
