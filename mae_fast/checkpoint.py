"""Loading and saving MAE weights, safely.

- Official files: ``torch.save({'model': state_dict, 'optimizer': ..., 'args': Namespace, ...})``;
  the ``mae_pretrain_*`` files hold the encoder only, ``mae_visualize_*`` encoder and decoder.
- Plain state dicts, and safetensors files.
- Our training checkpoints (written and resumed by :mod:`mae_fast.pretrain`): the authors' layout
  ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}`` with ``args`` a plain dict, so that both
  ``weights_only=True`` and the authors' ``misc.load_model`` read them.

Torch files are always read with ``weights_only=True``. The authors' training checkpoints pickle an
``argparse.Namespace`` under ``'args'``; we read the weights without building it (it becomes a
:class:`SkippedObject` holding plain data) and say so. Any other non-tensor global in the pickle is
refused, naming it: such a pickle could run code.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import zipfile
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


# ---------------------------------------------------------------------------- training checkpoints
# The authors' loader always loads a scaler state: a run without fp16 writes a fresh GradScaler's.
DEFAULT_SCALER_STATE = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                        "growth_interval": 2000, "_growth_tracker": 0}


def plain_args(args, **extra) -> dict:
    """``vars(args)`` as plain data (str, int, float, bool, None, lists): loadable with weights_only."""
    out = {}
    for key, value in {**vars(args), **extra}.items():
        if key == "func":  # the mae-fast dispatcher's handler
            continue
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = [v if isinstance(v, (bool, int, float, str)) or v is None else str(v) for v in value]
        else:
            out[key] = str(value)
    return out


def training_checkpoint(model_state: Mapping, optimizer_state: dict, epoch: int, scaler_state: dict | None,
                        args, **extra_args) -> dict:
    """The authors' layout, on the CPU; ``extra_args`` join ``args`` (e.g. ``world_size``)."""
    return {"model": {k: v.detach().cpu() for k, v in model_state.items()},
            "optimizer": optimizer_state,
            "epoch": epoch,
            "scaler": scaler_state or dict(DEFAULT_SCALER_STATE),
            "args": plain_args(args, **extra_args)}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (truncated, corrupt) or written (disk full): one clear message."""


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path.tmp`` in the same folder, fsync, then rename over ``path``: a crash
    mid-write never leaves a truncated checkpoint under the real name. A failing write (disk full,
    quota, I/O error) removes the ``.tmp`` and raises :class:`CheckpointError`; whatever was under
    ``path`` and the older checkpoints beside it are untouched."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        folder = os.path.dirname(os.path.abspath(path))
        intact = newest_intact_checkpoint(folder, exclude=path)
        raise CheckpointError(
            f"could not write checkpoint {path!r}: {err.strerror or err} (errno {err.errno}); "
            + (f"the newest intact checkpoint is {intact!r} (resume with --resume auto)" if intact
               else "there is no earlier intact checkpoint in that folder")) from err


def checkpoint_is_intact(path: str) -> bool:
    """Whether ``path`` is a complete torch zip archive: every member present and its CRC right
    (``torch.save`` stores them uncompressed with CRCs). Reads the file, builds nothing."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in names) and z.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError):
        return False


def newest_intact_checkpoint(output_dir: str, exclude: str | None = None) -> str | None:
    """The newest ``checkpoint-<epoch>.pth`` in ``output_dir`` that is intact (other than ``exclude``)."""
    for _, path in reversed(checkpoint_epochs(output_dir)):
        if exclude is not None and os.path.abspath(path) == os.path.abspath(exclude):
            continue
        if checkpoint_is_intact(path):
            return path
    return None


def checkpoint_epochs(output_dir: str) -> list[tuple[int, str]]:
    """``[(epoch, path)]`` of the ``checkpoint-<epoch>.pth`` files in ``output_dir``, oldest first."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")):
        m = re.fullmatch(r"checkpoint-(\d+)\.pth", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep <= 0``: keep all)."""
    if keep > 0:
        for _, old in checkpoint_epochs(output_dir)[:-keep]:
            os.remove(old)


def read_checkpoint(path: str) -> dict:
    """Read a training checkpoint with ``weights_only=True`` (the authors' pickled Namespace becomes
    an inert placeholder). A truncated or corrupt file is one :class:`CheckpointError` naming it and
    the newest intact checkpoint beside it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path!r}")
    try:
        obj, _ = read_torch_file(path)
    except Exception as err:
        if checkpoint_is_intact(path):
            raise  # a whole file that we refuse (e.g. a pickle that could run code): its own message
        intact = newest_intact_checkpoint(os.path.dirname(os.path.abspath(path)), exclude=path)
        size = os.path.getsize(path)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"--resume: {path!r} is truncated or corrupt ({size} bytes; {reason}). "
            + (f"The newest intact checkpoint beside it is {intact!r}: --resume {intact}, or --resume auto"
               if intact else "There is no intact checkpoint beside it.")) from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise ValueError(f"--resume: {path!r} is not a training checkpoint (no 'model' entry)")
    return obj


def find_resume_checkpoint(output_dir: str, say=print) -> str | None:
    """``--resume auto``: the newest checkpoint in ``output_dir`` that is intact; a broken newer one
    (truncated by a crash outside our atomic write, a full disk, a bad copy) is named and passed over."""
    for _, path in reversed(checkpoint_epochs(output_dir)):
        if checkpoint_is_intact(path):
            return path
        say(f"--resume auto: passing over {path!r}: truncated or corrupt")
    return None


def checkpoint_args(ckpt: dict) -> dict:
    """The training arguments a checkpoint holds, as a dict (``{}`` when it has none)."""
    a = ckpt.get("args")
    if isinstance(a, dict):
        return a
    state = getattr(a, "state", None)  # the authors' Namespace, read as a placeholder
    return state if isinstance(state, dict) else {}


def check_same_model(ckpt: dict, model: torch.nn.Module, args, path: str) -> None:
    """A clear error when ``ckpt`` holds another model than the one ``args`` asks for."""
    cargs = checkpoint_args(ckpt)
    for key in ("model", "input_size"):
        if key in cargs and cargs[key] != getattr(args, key):
            raise ValueError(f"--resume: {path!r} was trained with --{key.replace('_', '-')} {cargs[key]}, "
                             f"this run asks for {getattr(args, key)}; give the same settings or another checkpoint")
    state = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        what = "; ".join(s for s in (
            f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
            f"shapes differ: {shapes[:4]}" if shapes else "") if s)
        raise ValueError(f"--resume: {path!r} holds another model than {args.model} at {args.input_size} px ({what})")


def check_same_groups(ckpt: dict, groups: tuple[list[str], list[str]], decay_tokens: bool) -> None:
    """A clear error when the checkpoint's optimizer groups are not this run's (positions would
    pair the wrong tensors)."""
    theirs = [len(g["params"]) for g in ckpt["optimizer"].get("param_groups", [])]
    ours = [len(g) for g in groups]
    if theirs != ours:
        hint = ""
        if not decay_tokens and theirs == [ours[0] - 2, ours[1] + 2]:
            hint = " (it decays the cls/mask tokens, as the authors' code: drop --no-decay-tokens)"
        elif decay_tokens and theirs == [ours[0] + 2, ours[1] - 2]:
            hint = " (it was trained with --no-decay-tokens: add --no-decay-tokens)"
        raise ValueError(f"--resume: the checkpoint's optimizer has parameter groups of {theirs} tensors, "
                         f"this run's has {ours}{hint}")


def ids_from_fqns(osd: dict, groups: tuple[list[str], list[str]]) -> dict:
    """An optimizer state dict keyed by parameter names (``torch.distributed.checkpoint``'s full
    state dict) -> the standard one keyed by position, as ``optimizer.state_dict()`` writes it."""
    ids = {name: i for i, name in enumerate(groups[0] + groups[1])}
    return {"state": {ids[k]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [ids[n] for n in g["params"]],
                              **({"betas": tuple(g["betas"])} if "betas" in g else {})}
                             for g in osd["param_groups"]]}


def fqns_from_ids(osd: dict, groups: tuple[list[str], list[str]]) -> dict:
    """The inverse of :func:`ids_from_fqns`."""
    names = groups[0] + groups[1]
    return {"state": {names[int(k)]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in osd["param_groups"]]}
