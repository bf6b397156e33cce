"""HuggingFace ``ViTMAEForPreTraining`` <-> mae_fast state dicts, both of transformers' namings.

- ``v4`` (transformers 4.x): ``vit.encoder.layer.{i}.attention.attention.query`` ...
- ``v5`` (transformers 5.x): ``vit.layers.{i}.attention.q_proj`` ...

HF keeps q, k, v as three Linears where MAE has one packed ``qkv``: they are split and joined
along the output dimension (q rows first, as the packed layout ``(3, H, D)`` says).
"""
from __future__ import annotations

import json
import os

import torch

TOP_LEVEL = {  # ours -> (v4, v5)
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}
LAYER_PREFIX = {  # (ours, v4, v5)
    "encoder": ("blocks.{i}.", "vit.encoder.layer.{i}.", "vit.layers.{i}."),
    "decoder": ("decoder_blocks.{i}.", "decoder.decoder_layers.{i}.", "decoder.decoder_layers.{i}."),
}
BLOCK = {  # ours -> (v4, v5), within a layer; "qkv" is split
    "norm1": ("layernorm_before", "layernorm_before"),
    "attn.proj": ("attention.output.dense", "attention.o_proj"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "mlp.fc1": ("intermediate.dense", "mlp.fc1"),
    "mlp.fc2": ("output.dense", "mlp.fc2"),
}
QKV = {"v4": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
       "v5": ("attention.q_proj", "attention.k_proj", "attention.v_proj")}
SCHEMES = ("v4", "v5")


def detect_scheme(hf_state) -> str:
    if any(".encoder.layer." in k for k in hf_state):
        return "v4"
    if any(k.startswith("vit.layers.") for k in hf_state):
        return "v5"
    raise ValueError("not a HuggingFace ViTMAE state dict: no 'vit.encoder.layer.*' nor 'vit.layers.*' keys")


def _layer_count(state, prefix_template: str) -> int:
    n = 0
    while any(k.startswith(prefix_template.format(i=n)) for k in state):
        n += 1
    return n


def to_hf(state: dict[str, torch.Tensor], scheme: str = "v5") -> dict[str, torch.Tensor]:
    """Our state dict -> HF ViTMAEForPreTraining's."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    s = SCHEMES.index(scheme)
    out = {hf: state[ours] for ours, hf in TOP_LEVEL.items() if ours in state}
    for ours_t, *hf_t in LAYER_PREFIX.values():
        for i in range(_layer_count(state, ours_t)):
            ours, hf = ours_t.format(i=i), hf_t[s].format(i=i)
            for name, pair in BLOCK.items():
                for p in ("weight", "bias"):
                    out[f"{hf}{pair[s]}.{p}"] = state[f"{ours}{name}.{p}"]
            for p in ("weight", "bias"):
                for part, tensor in zip(QKV[scheme], state[f"{ours}attn.qkv.{p}"].chunk(3, dim=0)):
                    out[f"{hf}{part}.{p}"] = tensor
    return out


def from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ViTMAEForPreTraining's state dict (either naming) -> ours. Keys of HF's own that MAE
    has no use for are an error, so nothing is dropped silently."""
    scheme = detect_scheme(hf_state)
    s = SCHEMES.index(scheme)
    used: set[str] = set()

    def take(key):
        used.add(key)
        return hf_state[key]

    out = {ours: take(hf) for ours, hf in TOP_LEVEL.items() if hf in hf_state}
    for ours_t, *hf_t in LAYER_PREFIX.values():
        for i in range(_layer_count(hf_state, hf_t[s])):
            ours, hf = ours_t.format(i=i), hf_t[s].format(i=i)
            for name, pair in BLOCK.items():
                for p in ("weight", "bias"):
                    out[f"{ours}{name}.{p}"] = take(f"{hf}{pair[s]}.{p}")
            for p in ("weight", "bias"):
                out[f"{ours}attn.qkv.{p}"] = torch.cat([take(f"{hf}{part}.{p}") for part in QKV[scheme]], 0)
    left = sorted(set(hf_state) - used)
    if left:
        raise ValueError(f"HF ViTMAE keys with no place in MAE: {left[:8]}{' ...' if len(left) > 8 else ''}")
    return out


def hf_config_kwargs(model) -> dict:
    """``ViTMAEConfig`` keyword arguments describing ``model`` (the authors' MAE: eps 1e-6,
    exact GELU, qkv bias)."""
    blk, dblk = model.blocks[0], model.decoder_blocks[0]
    return dict(
        hidden_size=model.cls_token.shape[-1], num_hidden_layers=len(model.blocks),
        num_attention_heads=blk.attn.num_heads, intermediate_size=blk.mlp.fc1.out_features,
        decoder_hidden_size=model.mask_token.shape[-1], decoder_num_hidden_layers=len(model.decoder_blocks),
        decoder_num_attention_heads=dblk.attn.num_heads, decoder_intermediate_size=dblk.mlp.fc1.out_features,
        image_size=model.patch_embed.img_size[0], patch_size=model.patch_size, num_channels=model.in_chans,
        hidden_act="gelu", layer_norm_eps=blk.norm1.eps, qkv_bias=True, norm_pix_loss=model.norm_pix_loss,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def model_kwargs_from_hf_config(config: dict) -> dict:
    """Our constructor's keyword arguments from a HF ``config.json``."""
    from functools import partial

    import torch.nn as nn

    hidden, inter = config["hidden_size"], config["intermediate_size"]
    if config.get("decoder_intermediate_size", 4 * config["decoder_hidden_size"]) / config["decoder_hidden_size"] \
            != inter / hidden:
        raise ValueError("encoder and decoder MLP ratios differ; MaskedAutoencoderViT has one mlp_ratio")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act must be 'gelu' (exact), got {config['hidden_act']!r}")
    return dict(
        img_size=config["image_size"], patch_size=config["patch_size"], in_chans=config.get("num_channels", 3),
        embed_dim=hidden, depth=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
        decoder_embed_dim=config["decoder_hidden_size"], decoder_depth=config["decoder_num_hidden_layers"],
        decoder_num_heads=config["decoder_num_attention_heads"], mlp_ratio=inter / hidden,
        norm_layer=partial(nn.LayerNorm, eps=config.get("layer_norm_eps", 1e-12)),
        norm_pix_loss=config.get("norm_pix_loss", False))


def load_hf_folder(path: str | os.PathLike, **model_kwargs):
    """Build our model from a local HF ViTMAE folder (``config.json`` + ``model.safetensors``)."""
    from safetensors.torch import load_file

    from .models_mae import MaskedAutoencoderViT

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    model = MaskedAutoencoderViT(**model_kwargs_from_hf_config(config), **model_kwargs)
    state = from_hf(load_file(os.path.join(path, "model.safetensors")))
    model.load_state_dict(state, strict=True)
    return model
