"""The fine-tuning model: a drop-in for the authors' ``models_vit.py`` (timm 0.3.2's
``VisionTransformer`` with optional global average pooling).

Same constructor, factories, state_dict (keys, shapes, order), init under a seed, forward and
stochastic-depth draws as the reference (``shared/SPEC_VIT.md`` is the contract); the blocks run
through :func:`mae_fast.layers.forward_blocks`, so on CUDA the fused block ops and our attention
run them. Extra keyword: ``backend=`` as in :mod:`mae_fast.models_mae`. Not supported (a clear
error): a hybrid CNN backbone, ``qk_scale`` other than ``head_dim ** -0.5``, dropout
(``drop_rate``, ``attn_drop_rate``) above 0 — the authors fine-tune with drop path only.

:func:`load_mae_checkpoint` starts fine-tuning from an MAE checkpoint as the authors'
``main_finetune.py`` does.
"""
from __future__ import annotations

import math
import os
from functools import partial
from typing import Mapping

import torch
import torch.nn as nn

from .layers import Block, BlocksMixin, PatchEmbed, forward_blocks
from .model_checks import check_imgs


class VisionTransformer(BlocksMixin, nn.Module):
    """Vision Transformer with support for global average pooling."""

    def __init__(self, global_pool=False, img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4., qkv_bias=False, qk_scale=None,
                 drop_rate=0., attn_drop_rate=0., drop_path_rate=0., hybrid_backbone=None,
                 norm_layer=nn.LayerNorm, *, backend: str | None = None):
        super().__init__()
        _check_supported(embed_dim, num_heads, qk_scale, drop_rate, attn_drop_rate, hybrid_backbone)
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        # Construction order follows timm 0.3.2, so the same seed draws the same weights.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        # stochastic depth decay rule (on the CPU: plain numbers, also when built on the meta device)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer, drop_path=dpr[i])
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        nn.init.trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)

        self.global_pool = global_pool
        if self.global_pool:
            self.fc_norm = norm_layer(embed_dim)
            del self.norm  # remove the original norm
        self.in_chans = in_chans
        self.backend = backend

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'}

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=''):
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        check_imgs(x, self.in_chans, self.patch_embed.img_size, self.patch_embed.patch_size[0])
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        if self.global_pool:
            x = forward_blocks(self.blocks, x, None)
            return self.fc_norm(x[:, 1:, :].mean(dim=1))  # global pool without cls token
        return forward_blocks(self.blocks, x, self.norm)[:, 0]

    def forward(self, x):
        return self.head(self.forward_features(x))


def _check_supported(embed_dim, num_heads, qk_scale, drop_rate, attn_drop_rate, hybrid_backbone) -> None:
    if hybrid_backbone is not None:
        raise ValueError("hybrid_backbone is not supported by mae_fast.models_vit (the MAE models use none)")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
    head_dim = embed_dim // num_heads
    if qk_scale is not None and not math.isclose(qk_scale, head_dim ** -0.5):
        raise ValueError(f"qk_scale must be None or head_dim ** -0.5 = {head_dim ** -0.5:g}, got {qk_scale}")
    for name, rate in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate)):
        if rate != 0:
            raise ValueError(f"{name} must be 0 in mae_fast.models_vit (the authors fine-tune with drop path "
                             f"only; use drop_path_rate), got {rate}")


def vit_base_patch16(**kwargs):
    model = VisionTransformer(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
    return model


def vit_large_patch16(**kwargs):
    model = VisionTransformer(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
    return model


def vit_huge_patch14(**kwargs):
    model = VisionTransformer(
        patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
    return model


# Small configurations of ours (not the authors'): the encoders of models_mae's tiny and demo MAEs.
def vit_tiny_patch16(**kwargs):
    return VisionTransformer(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def vit_demo_patch8(**kwargs):
    kwargs.setdefault("img_size", 64)
    return VisionTransformer(patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


MODELS = {f.__name__: f for f in (vit_base_patch16, vit_large_patch16, vit_huge_patch14, vit_tiny_patch16,
                                  vit_demo_patch8)}


def create_model(name: str, **kwargs) -> VisionTransformer:
    """``MODELS[name](**kwargs)``, with a clear error for an unknown name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


# ---------------------------------------------------------------------------- from an MAE checkpoint

def interpolate_pos_embed(model: VisionTransformer, state: dict) -> None:
    """The authors' ``interpolate_pos_embed``: resize ``state['pos_embed']`` in place to the
    model's grid (cls row kept; the patch rows as a square grid, bicubic, ``align_corners=False``)."""
    if "pos_embed" not in state:
        return
    ckpt = state["pos_embed"]
    num_patches = model.patch_embed.num_patches
    num_extra = model.pos_embed.shape[-2] - num_patches
    orig, new = int((ckpt.shape[-2] - num_extra) ** 0.5), int(num_patches ** 0.5)
    if orig == new:
        return
    if orig * orig != ckpt.shape[-2] - num_extra or new * new != num_patches:
        raise ValueError(f"pos_embed: only square grids are interpolated, got {ckpt.shape[-2] - num_extra} "
                         f"checkpoint and {num_patches} model patches")
    extra, tokens = ckpt[:, :num_extra], ckpt[:, num_extra:]
    tokens = tokens.reshape(-1, orig, orig, ckpt.shape[-1]).permute(0, 3, 1, 2)
    tokens = nn.functional.interpolate(tokens.float(), size=(new, new), mode="bicubic", align_corners=False)
    state["pos_embed"] = torch.cat((extra, tokens.permute(0, 2, 3, 1).flatten(1, 2).to(ckpt.dtype)), dim=1)


def load_mae_checkpoint(model: VisionTransformer, source: str | os.PathLike | Mapping):
    """Start fine-tuning from an MAE checkpoint (a path read with ``weights_only=True``, or its
    ``model`` dict) as the authors' ``main_finetune.py`` does: drop a head of another shape,
    interpolate ``pos_embed`` to the model's grid, ``load_state_dict(strict=False)``, check that the
    missing keys are exactly the head (and ``fc_norm`` with global pooling), then draw the head's
    weight from a truncated normal with std 2e-5. Returns the ``load_state_dict`` result (the
    decoder's keys, ``mask_token`` and, with global pooling, ``norm.*`` are the unexpected ones)."""
    from .checkpoint import read_state_dict

    state, _ = read_state_dict(source)  # also unwraps {'model': ...} and DDP's module. prefix
    own = model.state_dict()
    for k in ("head.weight", "head.bias"):
        if k in state and state[k].shape != own[k].shape:
            del state[k]
    interpolate_pos_embed(model, state)
    msg = model.load_state_dict(state, strict=False)
    expected = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if model.global_pool else set())
    if set(msg.missing_keys) != expected:
        raise ValueError(f"the checkpoint does not hold this model's encoder: missing {sorted(msg.missing_keys)}, "
                         f"expected exactly {sorted(expected)}")
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    return msg
