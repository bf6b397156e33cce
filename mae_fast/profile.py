"""Where a training step's time goes: per stage, forward and backward, beside the FLOPs.

The step is the model's own forward pieces run in order (``masking_ids``, ``embed``, the
blocks, ``decoder_input``, ``head``, ``forward_loss``), with a timestamp at each stage boundary.
Backward boundaries come from gradient hooks on the boundary tensors: the gradient reaches them
in reverse stage order, so the time between two hooks is the backward of the stage between
them. On a GPU the timestamps are CUDA events on the current stream, so the spans hold device
time, not launch time. Each stage also runs inside ``record_function`` so a
``torch.profiler`` trace (``--trace``) shows the same names.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch.profiler import record_function

from . import flops
from .ops.embed import embed_visible_patches_op

STAGES = ("masking", "patch_embed", "encoder_blocks", "decoder_embed+unshuffle", "decoder_blocks", "head", "loss")
STAGE_FLOPS = {  # profile stage -> flops.stage_macs keys
    "patch_embed": ("patch_embed",),
    "encoder_blocks": ("encoder_attention", "encoder_mlp"),
    "decoder_embed+unshuffle": ("decoder_embed",),
    "decoder_blocks": ("decoder_attention", "decoder_mlp"),
    "head": ("decoder_pred",),
}
ENCODER = ("masking", "patch_embed", "encoder_blocks")


class _Clock:
    """Timestamps on the device's timeline."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b)
        return (b - a) * 1e3


def _staged_step(model, imgs, mask_ratio, noise, clock: _Clock):
    """One forward + backward; returns (forward marks, backward marks) in stage order."""
    fwd = [clock.mark()]
    bwd = {}

    def boundary(stage: str, t: torch.Tensor) -> torch.Tensor:
        fwd.append(clock.mark())
        if t.requires_grad:
            t.register_hook(lambda g: bwd.__setitem__(stage, clock.mark()))
        return t

    with record_function("masking"):
        ids_keep, ids_restore, mask = model.masking_ids(imgs.shape[0], model.num_patches, mask_ratio,
                                                        imgs.device, noise)
    fwd.append(clock.mark())
    with record_function("patch_embed"):
        x = boundary("patch_embed", model.embed(imgs, ids_keep, mask))
    with record_function("encoder_blocks"):
        for blk in model.blocks:
            x = blk(x)
        x = boundary("encoder_blocks", model.norm(x))
    with record_function("decoder_embed+unshuffle"):
        x = boundary("decoder_embed+unshuffle", model.decoder_input(x, ids_restore))
    with record_function("decoder_blocks"):
        for blk in model.decoder_blocks:
            x = blk(x)
        x = boundary("decoder_blocks", x)
    with record_function("head"):
        pred = boundary("head", model.head(x))
    with record_function("loss"):
        loss = model.forward_loss(imgs, pred, mask)
    fwd.append(clock.mark())
    bwd["start"] = clock.mark()
    with record_function("backward"):
        loss.backward()
    bwd["end"] = clock.mark()
    return fwd, bwd


def _spans(fwd, bwd, clock: _Clock) -> dict[str, tuple[float, float]]:
    """{stage: (forward ms, backward ms)}."""
    out = {stage: (clock.ms(fwd[i], fwd[i + 1]), 0.0) for i, stage in enumerate(STAGES)}
    # backward runs loss -> head -> ... -> patch_embed; each hook closes the stage after it
    order = ["start", "head", "decoder_blocks", "decoder_embed+unshuffle", "encoder_blocks", "patch_embed", "end"]
    owner = ["loss", "head", "decoder_blocks", "decoder_embed+unshuffle", "encoder_blocks", "patch_embed"]
    present = [k for k in order if k in bwd]
    for a, b in zip(present, present[1:]):
        stage = owner[order.index(b) - 1]
        out[stage] = (out[stage][0], out[stage][1] + clock.ms(bwd[a], bwd[b]))
    return out


@dataclass
class StageRow:
    stage: str
    forward_ms: float
    backward_ms: float
    time_share: float
    flops_share: float


def profile(model, imgs, mask_ratio=0.75, *, warmup=2, repeats=5, dtype=None, trace: str | None = None):
    """Median per-stage times over ``repeats`` steps; ``dtype`` enables autocast on CUDA."""
    device = imgs.device
    clock = _Clock(device)
    noise = torch.rand(imgs.shape[0], model.num_patches, device=device)
    autocast = torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    runs = []
    for i in range(warmup + repeats):
        with autocast:
            fwd, bwd = _staged_step(model, imgs, mask_ratio, noise, clock)
        if clock.cuda:
            torch.cuda.synchronize(device)
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            runs.append(_spans(fwd, bwd, clock))
    if trace:
        with torch.profiler.profile(record_shapes=False) as prof, autocast:
            _staged_step(model, imgs, mask_ratio, noise, clock)
        prof.export_chrome_trace(trace)
    med = {s: (statistics.median(r[s][0] for r in runs), statistics.median(r[s][1] for r in runs)) for s in STAGES}
    macs = flops.stage_macs(flops.ModelDims.of(model), mask_ratio, encoder_mask_tokens=model.encoder_mask_tokens,
                            visible_patch_embed=_embeds_visible_only(model, imgs, mask_ratio, noise))
    total_ms = sum(f + b for f, b in med.values())
    total_macs = sum(macs.values())
    return [StageRow(s, f, b, (f + b) / total_ms, sum(macs[k] for k in STAGE_FLOPS.get(s, ())) / total_macs)
            for s, (f, b) in med.items()]


def _embeds_visible_only(model, imgs, mask_ratio, noise) -> bool:
    """Whether the embedding runs the patch GEMM on the kept patches only (the fused op's
    implementations do; the reference embeds every patch): the FLOPs count what runs."""
    if not model.plain_patch_embed():
        return False
    ids_keep = model.masking_ids(imgs.shape[0], model.num_patches, mask_ratio, imgs.device, noise)[0]
    args = (imgs, ids_keep, model.patch_embed.proj.weight, model.patch_embed.proj.bias, model.pos_embed,
            model.cls_token)
    return embed_visible_patches_op.select(args, model.backend)[0] != "torch"


def format_profile(rows: list[StageRow], title: str) -> str:
    lines = [title, f"{'stage':<26}{'fwd ms':>9}{'bwd ms':>9}{'time %':>8}{'FLOPs %':>9}"]
    for r in rows:
        lines.append(f"{r.stage:<26}{r.forward_ms:>9.2f}{r.backward_ms:>9.2f}{100 * r.time_share:>7.1f}%"
                     f"{100 * r.flops_share:>8.1f}%")
    enc_t = sum(r.time_share for r in rows if r.stage in ENCODER)
    enc_f = sum(r.flops_share for r in rows if r.stage in ENCODER)
    lines.append(f"encoder: {100 * enc_t:.1f}% of time, {100 * enc_f:.1f}% of FLOPs; "
                 f"decoder + loss: {100 * (1 - enc_t):.1f}% of time, {100 * (1 - enc_f):.1f}% of FLOPs")
    return "\n".join(lines)


def rows_to_dicts(rows: list[StageRow]) -> list[dict]:
    return [asdict(r) for r in rows]
