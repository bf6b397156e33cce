"""Loading and saving MAE weights, safely.

- Official files: ``torch.save({'model': state_dict, 'optimizer': ..., 'args': Namespace, ...})``;
  the ``mae_pretrain_*`` files hold the encoder only, ``mae_visualize_*`` encoder and decoder.
- Plain state dicts, and safetensors files.

Torch files are always read with ``weights_only=True``. The authors' training checkpoints pickle an
``argparse.Namespace`` under ``'args'``; we read the weights without building it (it becomes a
:class:`SkippedObject` holding plain data) and say so. Any other non-tensor global in the pickle is
refused, naming it: such a pickle could run code.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .hf import from_hf as from_hf_state_dict  # noqa: F401  (public: HF ViTMAE <-> ours)
from .hf import load_hf_folder  # noqa: F401
from .hf import to_hf as to_hf_state_dict  # noqa: F401

log = logging.getLogger("mae_fast")

# Globals that the authors' checkpoints pickle and that we replace by inert placeholders.
SKIPPABLE_GLOBALS = ("argparse.Namespace",)
FIXED_TABLES = ("pos_embed", "decoder_pos_embed")
STATE_DICT_KEYS = ("model", "state_dict")


class SkippedObject:
    """Stands in for an object a checkpoint pickled, which we do not build. ``state`` holds the
    plain data it carried (e.g. the training arguments)."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.state = args, kwargs or None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<skipped {self.qualname}>"


def _placeholder(qualname: str) -> type:
    return type("Skipped_" + qualname.replace(".", "_"), (SkippedObject,), {"qualname": qualname})


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    regenerated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
                 for name, keys in vars(self).items() if keys]
        return "; ".join(parts) or "all keys matched"


def read_torch_file(path: str | os.PathLike) -> tuple[dict, list[str]]:
    """``torch.load(path, weights_only=True)``, with the authors' pickled ``argparse.Namespace``
    replaced by an inert placeholder. Returns ``(object, skipped)`` where ``skipped`` names what
    was not built."""
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    refused = [g for g in unsafe if g not in SKIPPABLE_GLOBALS]
    if refused:
        raise ValueError(
            f"{os.fspath(path)!r} pickles objects other than tensors and plain data: {refused}. Unpickling "
            f"them could run arbitrary code, so mae_fast will not; re-save the weights alone "
            f"(torch.save(model.state_dict(), ...)) from a trusted environment, or use safetensors")
    placeholders = [(_placeholder(g), g) for g in unsafe]
    with torch.serialization.safe_globals(placeholders):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    skipped = []
    if isinstance(obj, dict):
        skipped = [f"{k!r} ({v.qualname})" for k, v in obj.items() if isinstance(v, SkippedObject)]
    return obj, skipped


def read_state_dict(source: str | os.PathLike | Mapping) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model weights in ``source`` (a path to a .pth/.pt/.safetensors file, a checkpoint dict
    or a state dict) and a list of what was skipped."""
    skipped: list[str] = []
    if isinstance(source, (str, os.PathLike)):
        if os.fspath(source).endswith(".safetensors"):
            from safetensors.torch import load_file

            source = load_file(os.fspath(source))
        else:
            source, skipped = read_torch_file(source)
    if not isinstance(source, Mapping):
        raise TypeError(f"source must be a path, a checkpoint dict or a state dict, got {type(source).__name__}")
    for key in STATE_DICT_KEYS:
        if key in source and isinstance(source[key], Mapping):
            others = [k for k in source if k != key]
            if others:
                skipped.append(f"non-model entries {others}")
            source = source[key]
            break
    if any(k.startswith("vit.") for k in source):
        return from_hf_state_dict(dict(source)), skipped + ["converted from HuggingFace ViTMAE naming"]
    state = {}
    for k, v in source.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state dict entry {k!r} must be a tensor, got {type(v).__name__}")
        state[k.removeprefix("module.")] = v  # DDP-wrapped checkpoints
    return state, skipped


def load_pretrained(model: torch.nn.Module, source, *, strict: bool = False) -> LoadReport:
    """Load weights into ``model``; returns a :class:`LoadReport`.

    Shapes must match, except for the fixed sin-cos tables: a checkpoint made for another
    ``img_size`` gets the tables of the model's own grid (they are not learned). Missing keys
    (the decoder of an encoder-only ``mae_pretrain_*`` file) are reported, not an error, unless
    ``strict``."""
    state, skipped = read_state_dict(source)
    own = model.state_dict()
    report = LoadReport(skipped=skipped)
    to_load = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        if value.shape != own[key].shape:
            if key in FIXED_TABLES:  # the model already holds the table of its own grid
                report.regenerated.append(key)
                continue
            raise ValueError(f"checkpoint key {key!r} has shape {tuple(value.shape)}, "
                             f"but the model expects {tuple(own[key].shape)}")
        to_load[key] = value
    report.missing = [k for k in own if k not in to_load and k not in report.regenerated]
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"strict load failed: {report}")
    model.load_state_dict(to_load, strict=False)
    if report.missing or report.unexpected or report.regenerated or report.skipped:
        log.info("mae_fast: loaded with %s", report)
    return report


def save_safetensors(model_or_state, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the weights (a model or a state dict) as safetensors."""
    from safetensors.torch import save_file

    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.fspath(path),
              metadata={"format": "pt", **(metadata or {})})


def convert_to_safetensors(src, dst) -> list[str]:
    """Convert an official (or any torch) checkpoint to safetensors; returns what was skipped."""
    state, skipped = read_state_dict(src)
    save_safetensors(state, dst, metadata={"source": os.path.basename(os.fspath(src))})
    return skipped
