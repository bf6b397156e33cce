"""The encoder's way out: a timm ``VisionTransformer`` state dict and a HuggingFace ``ViTModel``
(or ``ViTForImageClassification``) folder, from an MAE checkpoint or a fine-tuned one.

    mae-fast export CKPT --timm vit.pth --hf vit_hf/       # also: python -m mae_fast.export ...

- **timm**: the keys of timm's ``vit_*_patch16_224.mae`` weights (``cls_token``, ``pos_embed``,
  ``patch_embed.proj.*``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``,
  ``norm.*``); an MAE checkpoint loses its decoder and ``mask_token``. A fine-tuned
  classifier keeps ``head.*`` (and ``fc_norm.*`` in place of ``norm.*`` with global pooling: timm's
  ``global_pool='avg', fc_norm=True``). The linear probe's non-affine BatchNorm is folded into the
  head's Linear, so the export is a plain ``head``. Written as ``.pth`` or ``.safetensors``.
- **HuggingFace**: ``config.json`` (``ViTConfig``: layer-norm eps 1e-6, exact GELU, qkv bias) and
  ``model.safetensors``; the packed ``qkv`` split into q, k, v. An encoder becomes a ``ViTModel``
  (load it with ``add_pooling_layer=False``: MAE has no pooler), a cls-token classifier a
  ``ViTForImageClassification``. HF pools the cls token only, so a global-pool classifier has no HF
  equivalent: a clear error. The naming is the installed transformers' (5.x: ``layers.{i}.
  attention.q_proj``; 4.x: ``encoder.layer.{i}.attention.attention.query``), or ``--hf-scheme``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from . import hf
from .checkpoint import checkpoint_args, read_state_dict, read_torch_file

ENCODER_TOP = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")
DROPPED = ("mask_token", "decoder_", "encoder_mask_token")


def _read(source) -> tuple[dict, dict]:
    """``(state, training args)`` of a path or a dict."""
    args = {}
    if isinstance(source, (str, os.PathLike)) and not os.fspath(source).endswith(".safetensors"):
        obj, _ = read_torch_file(source)
        if isinstance(obj, dict):
            args = checkpoint_args(obj)
        source = obj
    elif isinstance(source, dict):
        args = checkpoint_args(source)
    state, _ = read_state_dict(source)
    return state, args


def fold_probe_head(state: dict) -> dict:
    """The linear probe's ``head = Sequential(BatchNorm1d(affine=False), Linear)`` as one Linear:
    ``W (x - mean) / s + b = (W / s) x + (b - W mean / s)`` with ``s = sqrt(var + eps)``."""
    if "head.0.running_mean" not in state:
        return state
    out = {k: v for k, v in state.items() if not k.startswith("head.")}
    mean, var = state["head.0.running_mean"].double(), state["head.0.running_var"].double()
    w, b = state["head.1.weight"].double(), state["head.1.bias"].double()
    s = torch.sqrt(var + 1e-6)  # the probe's eps
    out["head.weight"] = (w / s).to(state["head.1.weight"].dtype)
    out["head.bias"] = (b - (w * (mean / s)).sum(-1)).to(state["head.1.bias"].dtype)
    return out


def timm_state_dict(source) -> dict[str, torch.Tensor]:
    """The encoder (and a fine-tuned head) under timm ``VisionTransformer``'s keys, in its order."""
    state, _ = _read(source)
    state = fold_probe_head(state)
    if "cls_token" not in state or "blocks.0.attn.qkv.weight" not in state:
        raise ValueError("not an MAE or ViT checkpoint: no cls_token / blocks.0.attn.qkv.weight")
    keep = {k: v for k, v in state.items() if not k.startswith(DROPPED)}
    order = [k for k in ENCODER_TOP if k in keep]
    order += [k for k in keep if k.startswith("blocks.")]
    order += [k for k in ("norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")
              if k in keep]
    left = sorted(set(keep) - set(order))
    if left:
        raise ValueError(f"keys with no place in a timm VisionTransformer: {left[:8]}")
    return {k: keep[k].detach().contiguous() for k in order}


def config_from_state(state: dict, num_heads: int | None = None, args: dict | None = None) -> dict:
    """``ViTConfig`` keyword arguments for a timm-keyed state dict. The head count is not in the
    weights: ``num_heads``, else the checkpoint's model name, else ``hidden / 64``."""
    hidden = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    if num_heads is None and args and args.get("model"):
        num_heads = _heads_of(args["model"])
    num_heads = num_heads or max(1, hidden // 64)
    cfg = dict(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=num_heads,
               intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0], hidden_act="gelu",
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6,
               image_size=grid * patch, patch_size=patch, num_channels=state["patch_embed.proj.weight"].shape[1],
               qkv_bias="blocks.0.attn.qkv.bias" in state, model_type="vit")
    if "head.weight" in state:
        cfg["num_labels"] = state["head.weight"].shape[0]
    return cfg


def _heads_of(name: str) -> int | None:
    from . import models_mae, models_vit

    factory = models_vit.MODELS.get(name) or models_mae.MODELS.get(name)
    if factory is None:
        return None
    with torch.device("meta"):
        return factory().blocks[0].attn.num_heads


def default_scheme() -> str:
    try:
        import transformers
    except ImportError:
        return "v4"
    return "v5" if int(transformers.__version__.split(".")[0]) >= 5 else "v4"


def hf_state_dict(state: dict, scheme: str | None = None) -> tuple[dict, str]:
    """``(HF state dict, architecture)``: ``ViTModel`` keys for an encoder, ``ViTForImageClassification``
    keys (``vit.*`` + ``classifier.*``) for a cls-token classifier."""
    if "fc_norm.weight" in state:
        raise ValueError("a global-pool classifier (fc_norm) has no HuggingFace ViT equivalent: HF classifies "
                         "the cls token after its final norm; export it with --timm, or fine-tune with --cls-token")
    scheme = scheme or default_scheme()
    out = hf.to_hf({k: v for k, v in state.items() if not k.startswith("head.")}, scheme)
    if "head.weight" not in state:
        return {k.removeprefix("vit."): v for k, v in out.items()}, "ViTModel"
    out["classifier.weight"], out["classifier.bias"] = state["head.weight"], state["head.bias"]
    return out, "ViTForImageClassification"


def write_hf_folder(state: dict, folder: str | os.PathLike, *, num_heads: int | None = None,
                    args: dict | None = None, scheme: str | None = None) -> str:
    """``config.json`` + ``model.safetensors`` in ``folder``; returns the architecture written."""
    from .checkpoint import save_safetensors

    tensors, arch = hf_state_dict(state, scheme)
    cfg = {**config_from_state(state, num_heads, args), "architectures": [arch]}
    if "num_labels" in cfg:
        n = cfg.pop("num_labels")
        cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
        cfg["label2id"] = {f"LABEL_{i}": i for i in range(n)}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_safetensors(tensors, os.path.join(folder, "model.safetensors"))
    return arch


def export(source, *, timm_path=None, hf_folder=None, num_heads=None, scheme=None) -> list[str]:
    """Write what is asked for; returns lines describing what was written."""
    state, args = _read(source)
    state = timm_state_dict(state)
    done = []
    if timm_path:
        if os.fspath(timm_path).endswith(".safetensors"):
            from .checkpoint import save_safetensors

            save_safetensors(state, timm_path)
        else:
            torch.save(state, timm_path)
        done.append(f"wrote {timm_path}: timm VisionTransformer state dict ({len(state)} tensors)")
    if hf_folder:
        arch = write_hf_folder(state, hf_folder, num_heads=num_heads, args=args, scheme=scheme)
        load = ("ViTModel.from_pretrained(folder, add_pooling_layer=False)" if arch == "ViTModel"
                else f"{arch}.from_pretrained(folder)")
        done.append(f"wrote {hf_folder}: HuggingFace {arch} (config.json + model.safetensors); load with {load}")
    return done


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("checkpoint", help="an MAE checkpoint (pretraining, the authors' .pth) or a fine-tuned one")
    parser.add_argument("--timm", metavar="FILE", help="write a timm VisionTransformer state dict (.pth or .safetensors)")
    parser.add_argument("--hf", metavar="FOLDER", help="write a HuggingFace ViTModel / ViTForImageClassification folder")
    parser.add_argument("--num-heads", type=int, help="attention heads (default: from the checkpoint's model name)")
    parser.add_argument("--hf-scheme", choices=hf.SCHEMES, help="HF key naming (default: the installed transformers')")
    return parser


def main(args: argparse.Namespace) -> int:
    if not (args.timm or args.hf):
        print("mae-fast export: error: give --timm FILE and/or --hf FOLDER", file=sys.stderr)
        return 2
    try:
        lines = export(args.checkpoint, timm_path=args.timm, hf_folder=args.hf, num_heads=args.num_heads,
                       scheme=args.hf_scheme)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"mae-fast export: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(add_arguments(argparse.ArgumentParser(prog="python -m mae_fast.export",
                                                        description=__doc__.split("\n\n")[0])).parse_args()))
