"""An independent, functional implementation of ../shared/SPEC_VIT.md (the authors' models_vit).

Written from the spec, not from mae_fast: the weights are drawn with plain torch.nn modules in
timm 0.3.2's construction order, then initialised in its order; the forward is explicit math
(softmax attention, layer norm, erf GELU, stochastic depth as timm draws it), in float64 with the
stochastic-depth draws made in ``draw_dtype`` (the model's dtype, so both draw the same numbers).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from spec_reference import gelu, layer_norm


def init_params(*, img_size, patch_size, in_chans, num_classes, embed_dim, depth, global_pool):
    """The state dict a seeded construction gives, keyed as the authors' model."""
    D, P = embed_dim, patch_size
    conv = nn.Conv2d(in_chans, D, P, P)  # PyTorch's default init, kept
    L = (img_size // P) ** 2
    cls, pos = torch.zeros(1, 1, D), torch.zeros(1, L + 1, D)
    linears = []
    for i in range(depth):  # blocks: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2
        for name, (fi, fo) in (("attn.qkv", (D, 3 * D)), ("attn.proj", (D, D)), ("mlp.fc1", (D, 4 * D)),
                               ("mlp.fc2", (4 * D, D))):
            linears.append((f"blocks.{i}.{name}", nn.Linear(fi, fo)))
    head = nn.Linear(D, num_classes)
    nn.init.trunc_normal_(pos, std=.02)
    nn.init.trunc_normal_(cls, std=.02)
    for _, lin in linears + [("head", head)]:
        nn.init.trunc_normal_(lin.weight, std=.02)
        nn.init.zeros_(lin.bias)
    p = {"cls_token": cls, "pos_embed": pos, "patch_embed.proj.weight": conv.weight.detach(),
         "patch_embed.proj.bias": conv.bias.detach()}
    ones, zeros = torch.ones(D), torch.zeros(D)
    for i in range(depth):
        lin = dict(linears[4 * i:4 * i + 4])
        for norm, names in (("norm1", ("attn.qkv", "attn.proj")), ("norm2", ("mlp.fc1", "mlp.fc2"))):
            p[f"blocks.{i}.{norm}.weight"], p[f"blocks.{i}.{norm}.bias"] = ones.clone(), zeros.clone()
            for n in names:
                m = lin[f"blocks.{i}.{n}"]
                p[f"blocks.{i}.{n}.weight"], p[f"blocks.{i}.{n}.bias"] = m.weight.detach(), m.bias.detach()
    if not global_pool:
        p["norm.weight"], p["norm.bias"] = ones.clone(), zeros.clone()
    p["head.weight"], p["head.bias"] = head.weight.detach(), head.bias.detach()
    if global_pool:
        p["fc_norm.weight"], p["fc_norm.bias"] = ones.clone(), zeros.clone()
    return p


def drop_path(x, rate, training, draw_dtype):
    if rate == 0 or not training:
        return x
    keep = 1 - rate
    r = torch.floor(keep + torch.rand((x.shape[0], 1, 1), dtype=draw_dtype)).to(x.dtype)
    return x / keep * r


def forward(p, imgs, *, patch_size, heads, depth, drop_path_rate=0.0, training=False, global_pool=False,
            eps=1e-6, draw_dtype=torch.float32):
    """Logits of ``imgs``; ``p`` float64 tensors (some may require grad)."""
    P = patch_size
    w = p["patch_embed.proj.weight"]
    x = torch.nn.functional.conv2d(imgs, w, p["patch_embed.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    x = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + p["pos_embed"]
    rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
    for i in range(depth):
        q = f"blocks.{i}."
        B, N, C = x.shape
        h = layer_norm(x, p[q + "norm1.weight"], p[q + "norm1.bias"], eps)
        qkv = (h @ p[q + "attn.qkv.weight"].T + p[q + "attn.qkv.bias"]).reshape(B, N, 3, heads, C // heads)
        qq, kk, vv = qkv.permute(2, 0, 3, 1, 4)
        a = ((qq @ kk.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1) @ vv
        a = a.transpose(1, 2).reshape(B, N, C) @ p[q + "attn.proj.weight"].T + p[q + "attn.proj.bias"]
        x = x + drop_path(a, rates[i], training, draw_dtype)
        h = layer_norm(x, p[q + "norm2.weight"], p[q + "norm2.bias"], eps)
        h = gelu(h @ p[q + "mlp.fc1.weight"].T + p[q + "mlp.fc1.bias"]) @ p[q + "mlp.fc2.weight"].T + p[q + "mlp.fc2.bias"]
        x = x + drop_path(h, rates[i], training, draw_dtype)
    if global_pool:
        feat = layer_norm(x[:, 1:].mean(dim=1), p["fc_norm.weight"], p["fc_norm.bias"], eps)
    else:
        feat = layer_norm(x, p["norm.weight"], p["norm.bias"], eps)[:, 0]
    return feat @ p["head.weight"].T + p["head.bias"]


def n_params(D, depth, L, in_chans, P, classes):
    """Parameters as the spec counts them (norm or fc_norm: the same size)."""
    block = 2 * D + (3 * D * D + 3 * D) + (D * D + D) + 2 * D + (4 * D * D + 4 * D) + (4 * D * D + D)
    return D * in_chans * P * P + D + D + (L + 1) * D + depth * block + 2 * D + D * classes + classes

