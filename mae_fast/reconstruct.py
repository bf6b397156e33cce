"""Reconstructions as PNG grids: original | masked | reconstruction | reconstruction with the visible
patches pasted back, one row per image.

    mae-fast reconstruct --checkpoint mae_visualize_vit_large.pth photo.jpg other.png
    python -m mae_fast.reconstruct --checkpoint output_dir/checkpoint-399.pth img.jpg --mask-ratio 0.75

Any checkpoint with a decoder: our training checkpoints (the model is read from their ``args``),
the authors' training checkpoints and ``mae_visualize_*`` files (the model is read from the pickled
``args`` when there is one, else recognised from the weights' shapes, else give ``--model``),
state dicts and safetensors files. All are read with ``weights_only=True`` through
:mod:`mae_fast.checkpoint`. Images are resized (shorter side, bicubic) and centre-cropped to the
model's input size and normalised with ImageNet mean/std, as in training.

For a ``norm_pix_loss`` model the prediction is per-patch normalised pixels; for display it is
de-normalised with the mean and variance of the image's own patch (what the loss normalised the
target with), as the authors' visualisation does.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from . import data as data_mod
from .checkpoint import checkpoint_args, load_pretrained, read_state_dict, read_torch_file
from .models_mae import MODELS, create_model


# ---------------------------------------------------------------------------- the model
def infer_model_name(state: dict) -> str | None:
    """The first registered model whose architecture matches ``state``'s shapes (the number of
    heads is not in the weights, so only registered configurations can be recognised)."""
    need = ("cls_token", "patch_embed.proj.weight", "mask_token")
    if not all(k in state for k in need):
        return None

    def depth(prefix):
        return len({k.split(".")[1] for k in state if k.startswith(prefix + ".")})

    sig = (state["cls_token"].shape[-1], depth("blocks"), tuple(state["patch_embed.proj.weight"].shape[1:]),
           state["mask_token"].shape[-1], depth("decoder_blocks"))
    for name, factory in MODELS.items():
        with torch.device("meta"):
            m = factory()
        msig = (m.cls_token.shape[-1], len(m.blocks), tuple(m.patch_embed.proj.weight.shape[1:]),
                m.mask_token.shape[-1], len(m.decoder_blocks))
        if msig == sig:
            return name
    return None


def _input_size_of(state: dict) -> int | None:
    table = state.get("decoder_pos_embed", state.get("pos_embed"))
    if table is None or "patch_embed.proj.weight" not in state:
        return None
    grid = int(round((table.shape[1] - 1) ** 0.5))
    return grid * state["patch_embed.proj.weight"].shape[-1]


def model_from_checkpoint(path: str, *, model: str | None = None, input_size: int | None = None,
                          norm_pix_loss: bool | None = None, backend: str | None = None):
    """Build the model a checkpoint holds and load it. Returns ``(model, info)`` where ``info``
    says what was inferred from where."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint: no file at {path!r}")
    cargs: dict = {}
    if path.endswith(".safetensors"):
        state, _ = read_state_dict(path)
    else:
        obj, _ = read_torch_file(path)
        if isinstance(obj, dict):
            cargs = checkpoint_args(obj)
        state, _ = read_state_dict(obj)
    if "decoder_pred.weight" not in state:
        raise ValueError(f"{path!r} has no decoder (an encoder-only mae_pretrain_* file?): reconstructions need "
                         f"the decoder, as in the authors' mae_visualize_* files or our training checkpoints")
    info = {}
    name = model or cargs.get("model")
    info["model"] = "--model" if model else ("checkpoint args" if name else "weight shapes")
    name = name or infer_model_name(state)
    if name is None:
        raise ValueError(f"cannot tell which model {path!r} holds: give --model (one of "
                         f"{', '.join(sorted(MODELS))})")
    size = input_size or cargs.get("input_size") or _input_size_of(state) or 224
    npl = norm_pix_loss if norm_pix_loss is not None else bool(cargs.get("norm_pix_loss", False))
    info.update(name=name, input_size=size, norm_pix_loss=npl,
                norm_pix_loss_from="option" if norm_pix_loss is not None else
                ("checkpoint args" if "norm_pix_loss" in cargs else "default (off)"))
    net = create_model(name, img_size=size, norm_pix_loss=npl, backend=backend)
    report = load_pretrained(net, state, strict=False)
    if report.missing or report.unexpected:
        raise ValueError(f"{path!r} does not match {name} at {size}px: {report}; give the right --model")
    return net.eval(), info


# ---------------------------------------------------------------------------- pictures
@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, *, mask_ratio: float = 0.75, seed: int = 0) -> dict:
    """``imgs`` (N, C, H, W), normalised -> the four panels (normalised) and the loss. The mask
    is drawn from ``seed`` (the same patches for the same seed)."""
    model.eval()
    n, L = imgs.shape[0], model.num_patches
    noise = torch.rand(n, L, generator=torch.Generator().manual_seed(seed)).to(imgs.device)
    loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    pred = pred.float()
    if model.norm_pix_loss:
        target = model.patchify(imgs)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    y = model.unpatchify(pred)
    m = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]).to(pred.dtype))
    masked = imgs * (1 - m)
    return {"original": imgs, "masked": masked, "reconstruction": y, "pasted": masked + y * m,
            "loss": float(loss)}


PANELS = (("original", "original"), ("masked", "masked"), ("reconstruction", "reconstruction"),
          ("pasted", "reconstruction + visible"))


def to_uint8(x: torch.Tensor):
    """(3, H, W) normalised -> (H, W, 3) uint8 numpy array."""
    img = data_mod.denormalize(x.detach().float().cpu()).clamp(0, 1)
    return (img.permute(1, 2, 0) * 255).round().byte().numpy()


def grid_image(panels: dict, *, scale: int = 1, titles: bool = True, gap: int = 4):
    """A PIL image: one row per image, the four panels side by side, titles on top."""
    from PIL import Image, ImageDraw

    n, _, h, w = panels["original"].shape
    h, w = h * scale, w * scale
    top = 16 if titles else 0
    canvas = Image.new("RGB", (4 * w + 5 * gap, top + n * h + (n + 1) * gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (key, title) in enumerate(PANELS):
        x0 = gap + c * (w + gap)
        if titles:
            draw.text((x0 + 2, 2), title, fill=(0, 0, 0))
        for r in range(n):
            tile = Image.fromarray(to_uint8(panels[key][r]), "RGB")
            if scale != 1:
                tile = tile.resize((w, h), Image.NEAREST)
            canvas.paste(tile, (x0, top + gap + r * (h + gap)))
    return canvas


def save_grid(model, imgs: torch.Tensor, path: str, *, mask_ratio: float = 0.75, seed: int = 0,
              scale: int | None = None) -> float:
    """Write the grid of ``imgs`` (N, C, H, W normalised) to ``path`` (PNG); returns the loss."""
    panels = reconstruct(model, imgs, mask_ratio=mask_ratio, seed=seed)
    if scale is None:
        scale = max(1, 224 // imgs.shape[-1])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid_image(panels, scale=scale).save(path, format="PNG", optimize=True)
    return panels["loss"]


# ---------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("images", nargs="+", help="image files (any size: resized and centre-cropped)")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint with a decoder: ours, the authors' training or mae_visualize_* "
                             "files, a state dict or safetensors")
    parser.add_argument("--model", help="the architecture, when the checkpoint does not say (e.g. "
                                        "mae_vit_large_patch16 for mae_visualize_vit_large.pth)")
    parser.add_argument("--input-size", type=int, help="default: from the checkpoint")
    parser.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                        help="whether the model predicts per-patch normalised pixels (default: from the "
                             "checkpoint's args, else off, as the authors' mae_visualize_* models)")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    parser.add_argument("--out-dir", default=".", help="where <image>_mae.png go (default .)")
    parser.add_argument("--scale", type=int, help="pixel upscaling of the panels (default: to ~224 px)")
    parser.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"))
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        model, info = model_from_checkpoint(args.checkpoint, model=args.model, input_size=args.input_size,
                                            norm_pix_loss=args.norm_pix_loss, backend=args.backend)
        print(f"{info['name']} at {info['input_size']}px (model from {info['model']}; norm_pix_loss "
              f"{info['norm_pix_loss']}, from {info['norm_pix_loss_from']})")
        for path in args.images:
            img = data_mod.load_image(path, info["input_size"]).unsqueeze(0)
            stem = os.path.splitext(os.path.basename(path))[0]
            out = os.path.join(args.out_dir, f"{stem}_mae.png")
            loss = save_grid(model, img, out, mask_ratio=args.mask_ratio, seed=args.seed, scale=args.scale)
            print(f"wrote {out} (loss on the removed patches {loss:.4f})")
    except (ValueError, FileNotFoundError) as err:
        print(f"mae-fast reconstruct: error: {err}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="python -m mae_fast.reconstruct",
                                                 description=__doc__.split("\n\n")[0]))


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
