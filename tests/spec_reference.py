"""An independent, functional float64 implementation of ../shared/SPEC.md.

Written from the spec, not from mae_fast: explicit attention math (no SDPA), explicit layer norm
and erf GELU, the reference's cat/gather glue. It takes a state dict (float64 tensors, some of
which may require grad) and returns (loss, pred, mask).
"""
from __future__ import annotations

import math

import torch


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def block(x, p, prefix, heads, eps):
    B, N, C = x.shape
    h = layer_norm(x, p[prefix + "norm1.weight"], p[prefix + "norm1.bias"], eps)
    qkv = h @ p[prefix + "attn.qkv.weight"].T + p[prefix + "attn.qkv.bias"]
    qkv = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (C // heads) ** -0.5
    attn = attn.softmax(dim=-1)
    a = (attn @ v).transpose(1, 2).reshape(B, N, C)
    x = x + a @ p[prefix + "attn.proj.weight"].T + p[prefix + "attn.proj.bias"]
    h = layer_norm(x, p[prefix + "norm2.weight"], p[prefix + "norm2.bias"], eps)
    h = gelu(h @ p[prefix + "mlp.fc1.weight"].T + p[prefix + "mlp.fc1.bias"])
    return x + h @ p[prefix + "mlp.fc2.weight"].T + p[prefix + "mlp.fc2.bias"]


def patchify(imgs, P):
    N, C, H, W = imgs.shape
    h, w = H // P, W // P
    x = imgs.reshape(N, C, h, P, w, P).permute(0, 2, 4, 3, 5, 1)  # n h w p q c
    return x.reshape(N, h * w, P * P * C)


def mask_from_noise(noise, mask_ratio):
    N, L = noise.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(N, L, dtype=torch.float64)
    mask[:, :len_keep] = 0
    return ids_shuffle[:, :len_keep], ids_restore, torch.gather(mask, 1, ids_restore)


def forward(p, imgs, noise, *, patch_size, heads, decoder_heads, depth, decoder_depth,
            mask_ratio=0.75, norm_pix_loss=False, eps=1e-6):
    P = patch_size
    N = imgs.shape[0]
    # patch embedding as a per-patch linear map in (c, p, q) order
    W = p["patch_embed.proj.weight"]
    D = W.shape[0]
    patches_cpq = patchify(imgs, P).reshape(N, -1, P, P, imgs.shape[1]).permute(0, 1, 4, 2, 3).flatten(2)
    x = patches_cpq @ W.reshape(D, -1).T + p["patch_embed.proj.bias"]
    x = x + p["pos_embed"][:, 1:]

    ids_keep, ids_restore, mask = mask_from_noise(noise, mask_ratio)
    x = torch.stack([x[n, ids_keep[n]] for n in range(N)])
    cls = p["cls_token"] + p["pos_embed"][:, :1]
    x = torch.cat([cls.expand(N, -1, -1), x], 1)
    for i in range(depth):
        x = block(x, p, f"blocks.{i}.", heads, eps)
    x = layer_norm(x, p["norm.weight"], p["norm.bias"], eps)

    x = x @ p["decoder_embed.weight"].T + p["decoder_embed.bias"]
    L = ids_restore.shape[1]
    K = ids_keep.shape[1]
    rows = []
    for n in range(N):
        full = torch.cat([x[n, 1:], p["mask_token"][0].expand(L - K, -1)], 0)  # shuffled order
        rows.append(torch.cat([x[n, :1], full[ids_restore[n]]], 0))
    x = torch.stack(rows) + p["decoder_pos_embed"]
    for i in range(decoder_depth):
        x = block(x, p, f"decoder_blocks.{i}.", decoder_heads, eps)
    x = layer_norm(x, p["decoder_norm.weight"], p["decoder_norm.bias"], eps)
    pred = (x @ p["decoder_pred.weight"].T + p["decoder_pred.bias"])[:, 1:]

    target = patchify(imgs, P)
    if norm_pix_loss:
        mean = target.mean(-1, keepdim=True)
        var = ((target - mean) ** 2).sum(-1, keepdim=True) / (target.shape[-1] - 1)
        target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(-1)
    loss = (loss * mask).sum() / mask.sum()
    return loss, pred, mask
