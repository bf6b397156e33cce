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


# ---------------------------------------------------------------------------- our kernels inside HF models
# Liger-style: the HF model keeps its modules, parameters and state_dict; each transformer layer's
# forward is replaced in place by one that runs mae_fast's ops on the layer's own parameters.
LAYER_CLASSES = ("ViTLayer", "ViTMAELayer")
_LAYER_PARTS = {  # (q, k, v, o, fc1, fc2) by naming: transformers 5.x, 4.x
    "v5": ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"),
    "v4": ("attention.attention.query", "attention.attention.key", "attention.attention.value",
           "attention.output.dense", "intermediate.dense", "output.dense"),
}


def apply_to_vit(model, backend: str | None = None):
    """Swap mae_fast's attention and fused block ops into a HuggingFace ``ViTModel``,
    ``ViTForImageClassification``, ``ViTMAEModel`` or ``ViTMAEForPreTraining`` (any module holding
    ``ViTLayer`` / ``ViTMAELayer`` layers), in place; returns the model.

    Each layer then runs: ``layer_norm`` of ``layernorm_before``; one packed qkv GEMM (HF's q, k, v
    weights concatenated each call, so gradients still reach HF's own parameters); our attention;
    the output projection without its bias; ``add_layer_norm`` (the residual add, that bias and
    ``layernorm_after`` in one op, cast for fc1 under autocast); ``bias_gelu`` on fc1; fc2 and the
    residual. Outputs equal HF's own within the dtype's tolerance. A call the fused layer does not
    cover (an attention mask, ``output_attentions``, dropout in training, an activation other
    than exact GELU) runs HF's original forward. ``backend`` as in :mod:`mae_fast.models_mae`
    (None: ``use_backend`` / ``MAE_FAST_BACKEND`` / auto). For a Trainer::

        from mae_fast.hf import apply_to_vit
        model = ViTForImageClassification.from_pretrained("google/vit-base-patch16-224")
        apply_to_vit(model)      # then Trainer(model=model, ...) as before
    """
    from .ops._backend import check_backend_name

    if backend is not None:
        check_backend_name(backend)
    n = 0
    for module in model.modules():
        if type(module).__name__ in LAYER_CLASSES and not hasattr(module, "_mae_fast_original_forward"):
            parts = _layer_parts(module)
            if parts is None:
                continue
            module._mae_fast_parts, module._mae_fast_backend = parts, backend
            module._mae_fast_head_dim = _head_dim(module)
            module._mae_fast_original_forward = module.forward
            module.forward = _fused_layer_forward.__get__(module)
            n += 1
    if n == 0:
        raise ValueError(f"no ViTLayer / ViTMAELayer in {type(model).__name__}: nothing to apply mae_fast to")
    return model


apply_to_vit_mae = apply_to_vit  # the same layers


def _get(module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _layer_parts(layer):
    import torch.nn as nn

    for names in _LAYER_PARTS.values():
        mods = [_get(layer, p) for p in names]
        if all(isinstance(m, nn.Linear) for m in mods):
            act = _get(layer, "mlp.activation_fn") or _get(layer, "intermediate.intermediate_act_fn")
            exact_gelu = type(act).__name__ == "GELUActivation" or (isinstance(act, nn.GELU) and act.approximate == "none")
            return tuple(mods) if exact_gelu else None
    return None


def _fused_layer_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    import torch.nn.functional as F

    from . import ops
    from .ops._backend import autocast_dtype

    dropout = getattr(self, "dropout", None)
    if (attention_mask is not None or args or kwargs.get("output_attentions") or kwargs.get("head_mask") is not None
            or (self.training and ((dropout is not None and dropout.p > 0)
                                   or getattr(self.attention, "attention_dropout", 0) > 0))):
        return self._mae_fast_original_forward(hidden_states, attention_mask, *args, **kwargs)
    q, k, v, o, fc1, fc2 = self._mae_fast_parts
    backend, ln1, ln2 = self._mae_fast_backend, self.layernorm_before, self.layernorm_after
    x = hidden_states
    B, N, C = x.shape
    cast = autocast_dtype(x.device)
    h = ops.layer_norm(x, ln1.weight, ln1.bias, ln1.eps, out_dtype=cast, backend=backend)
    w = torch.cat((q.weight, k.weight, v.weight))
    b = torch.cat((q.bias, k.bias, v.bias)) if q.bias is not None else None
    heads = ops.attention(F.linear(h, w, b).view(B, N, 3, -1, self._mae_fast_head_dim), backend=backend)
    x, normed = ops.add_layer_norm(x, F.linear(heads, o.weight), ln2.weight, ln2.bias, ln2.eps, bias=o.bias,
                                   out_dtype=cast, backend=backend)
    m = ops.bias_gelu(F.linear(normed, fc1.weight), fc1.bias, backend=backend)
    out = x + F.linear(m, fc2.weight, fc2.bias)
    return out if _returns_tensor() else (out,)


def _head_dim(layer) -> int:
    att = layer.attention
    inner = att if hasattr(att, "head_dim") else getattr(att, "attention", att)
    return getattr(inner, "head_dim", None) or inner.attention_head_size


def _returns_tensor() -> bool:
    """transformers 5.x layers return a tensor; 4.x a tuple (output, attentions...)."""
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5
