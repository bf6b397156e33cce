"""Where a training step's time goes: per stage, per kernel kind, and per decoder design.

- :func:`profile` (``mae-fast profile``): time per stage, forward and backward, beside the FLOPs;
- :func:`kernel_profile` (``mae-fast profile --kernels``, CUDA only): the GPU time of one step's
  kernels, grouped by kind (:data:`KINDS`) for the encoder and the decoder, each beside its floor;
- :func:`decoder_ablation` (``mae-fast bench --ablate-decoder``): the paper's decoder depth and
  width sweeps in wall-clock, each point's step time and decoder time share beside its FLOPs share.

Stage profile: the step is the model's own forward pieces run in order (``masking_ids``, ``embed``,
the blocks with the norm after them, ``decoder_input``, the decoder blocks with their norm,
``predict``, ``forward_loss``), with a timestamp at each stage boundary.
Backward boundaries come from gradient hooks on the boundary tensors: the gradient reaches them
in reverse stage order, so the time between two hooks is the backward of the stage between
them. On a GPU the timestamps are CUDA events on the current stream, so the spans hold device
time, not launch time. Each stage also runs inside ``record_function`` so a
``torch.profiler`` trace (``--trace``) shows the same names.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch.profiler import record_function

from . import bench, flops, models_mae
from .layers import forward_blocks
from .model_checks import len_keep_for_loss
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
    with record_function("encoder_blocks"):  # the blocks and the norm after them, as the model runs them
        x = boundary("encoder_blocks", forward_blocks(model.blocks, x, model.norm))
    with record_function("decoder_embed+unshuffle"):
        x = boundary("decoder_embed+unshuffle", model.decoder_input(x, ids_restore))
    with record_function("decoder_blocks"):
        x = boundary("decoder_blocks", forward_blocks(model.decoder_blocks, x, model.decoder_norm))
    with record_function("head"):
        pred = boundary("head", model.predict(x))
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


# ---------------------------------------------------------------------------- the split step
PARTS = ("encoder", "decoder")
RANGE_PREFIX = "mae_fast/"  # record_function ranges of the split step: mae_fast/<part>/<phase>
PHASES = ("forward", "backward", "optimizer")


def part_of(param_name: str) -> str:
    """``"decoder"`` for the decoder's parameters (``decoder_*``, ``mask_token``), else ``"encoder"``:
    the same cut as :data:`flops.ENCODER_STAGES` (``decoder_embed`` belongs to the decoder)."""
    return "decoder" if param_name.startswith("decoder_") or param_name == "mask_token" else "encoder"


def part_optimizers(model) -> dict:
    """One AdamW (the bench's recipe) per part: AdamW acts per parameter, so two optimizers are
    the same update as one, and each part's optimizer kernels can be timed apart."""
    groups = {part: [] for part in PARTS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[part_of(name)].append(p)
    return {part: bench.make_optimizer(ps) for part, ps in groups.items() if ps}


def split_step(model, imgs, mask_ratio, noise, optimizers: dict, autocast=None, mark=None) -> torch.Tensor:
    """One training step cut at the latent: the encoder's forward, the decoder's forward and
    loss, the decoder's backward (which ends at the latent's gradient), the encoder's backward
    from it, then each part's optimizer step -- the same work as ``model(imgs)``, backward and
    AdamW, in an order where every kernel belongs to one part and one phase. Each piece runs in a
    ``record_function`` range ``mae_fast/<part>/<phase>``; ``mark(label)``, when given, is called
    at each boundary (``start``, ``encoder_forward``, ``decoder_forward``, ``decoder_backward``,
    ``encoder_backward``, ``optimizer``). Returns the loss (detached)."""
    autocast = autocast or contextlib.nullcontext()
    mark = mark or (lambda label: None)
    keep = len_keep_for_loss(model.num_patches, mask_ratio)
    mark("start")
    with record_function(f"{RANGE_PREFIX}encoder/forward"), autocast:
        latent, mask, ids_restore = model.forward_encoder(imgs, mask_ratio, noise)
    mark("encoder_forward")
    z = latent.detach().requires_grad_()
    with record_function(f"{RANGE_PREFIX}decoder/forward"), autocast:
        pred_ids = torch.argsort(ids_restore, dim=1)[:, keep:] if model.pred_masked_only else None
        pred = model.forward_decoder(z, ids_restore, pred_ids)
        loss = model.forward_loss(imgs, pred, mask, pred_ids)
    mark("decoder_forward")
    with record_function(f"{RANGE_PREFIX}decoder/backward"):
        loss.backward()
    mark("decoder_backward")
    with record_function(f"{RANGE_PREFIX}encoder/backward"):
        latent.backward(z.grad)
    mark("encoder_backward")
    for part, opt in optimizers.items():
        with record_function(f"{RANGE_PREFIX}{part}/optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
    mark("optimizer")
    return loss.detach()


def split_spans(marks: dict, clock: _Clock) -> dict:
    """ms of a :func:`split_step` from its marks: ``step`` (everything), ``encoder`` and
    ``decoder`` (forward + backward), ``optimizer``."""
    ms = clock.ms
    enc = ms(marks["start"], marks["encoder_forward"]) + ms(marks["decoder_backward"], marks["encoder_backward"])
    dec = ms(marks["encoder_forward"], marks["decoder_backward"])  # its forward + loss, then its backward
    return {"step": ms(marks["start"], marks["optimizer"]), "encoder": enc, "decoder": dec,
            "optimizer": ms(marks["encoder_backward"], marks["optimizer"])}


# ---------------------------------------------------------------------------- kernels by kind
KINDS = ("GEMM", "attention", "norm", "elementwise", "optimizer", "copy/other")
# Our own kernels by name (the CUDA extension's __global__ functions, the Triton ops' jit
# functions), then the libraries' by pattern; first match wins, so the order matters: a
# multi_tensor_apply or an fmha kernel carries functor / cutlass names of the later kinds, a
# dtype cast is an elementwise kernel whose functor is a copy.
_KIND_RULES = (
    ("attention", ("attention_fwd_kernel", "attention_bwd_")),
    ("norm", ("_add_ln_", "_ln_fwd", "_ln_bwd")),
    ("elementwise", ("_bias_gelu_", "_embed_epilogue", "_patch_mse_")),
    ("copy/other", ("_patch_copy", "_unshuffle_")),
    ("optimizer", ("multi_tensor_apply", "adam", "_foreach_", "fused_sgd")),
    ("attention", ("flash", "fmha", "sdpa", "softmax", "attention", "mha_")),
    ("norm", ("layer_norm", "layernorm", "gammabeta", "rms_norm", "rmsnorm", "batch_norm", "group_norm")),
    ("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk", "matmul", "wgmma", "conv", "triton_tem",
              "sm90_", "sm80_", "ampere_", "hopper_", "_mm_", "bmm")),
    ("copy/other", ("copy", "memcpy", "memset", "gather", "scatter", "index", "fill", "sort", "rand",
                    "distribution", "arange", "cat_")),
    ("elementwise", ("elementwise", "gelu", "add", "mul", "div", "sub", "reduce", "sum", "mean", "pow", "sqrt",
                     "exp", "where", "clamp", "neg", "triton_poi", "triton_red", "triton_per")),
)


def kernel_kind(name: str) -> str:
    """The kind (:data:`KINDS`) of a GPU kernel, from its name (``copy/other`` when unknown)."""
    low = name.lower()
    for kind, patterns in _KIND_RULES:
        if any(p in low for p in patterns):
            return kind
    return "copy/other"


@dataclass
class KernelEvent:
    part: str  # "encoder", "decoder", or "other" (launched outside the step's ranges)
    phase: str  # "forward", "backward", "optimizer", or "other"
    name: str
    us: float


_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def attribute_kernels(trace_events: list[dict], prefix: str = RANGE_PREFIX) -> list[KernelEvent]:
    """Each GPU activity of a chrome trace (``torch.profiler``'s export) with the range that
    launched it. A kernel runs later than its launch, on the GPU's clock, so it is matched by its
    ``correlation`` id to the runtime/driver call that launched it, and that call's CPU timestamp
    is looked up among the ``record_function`` ranges named ``<prefix><part>/<phase>``. Time, not
    the thread, decides: backward's kernels are launched by autograd's device thread while the
    main thread waits inside the range; the ranges follow one another and never overlap. A kernel
    whose launch was not recorded falls back on the range's copy on the GPU's timeline
    (``gpu_user_annotation``) that holds it; else it is ``other``."""
    cpu_ranges, gpu_ranges, launches, device = [], [], {}, []
    for ev in trace_events:
        if ev.get("ph") != "X":
            continue
        cat = str(ev.get("cat", "")).lower()
        name = str(ev.get("name", ""))
        corr = (ev.get("args") or {}).get("correlation")
        if name.startswith(prefix):
            part, _, phase = name[len(prefix):].partition("/")
            span = (float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0)), part, phase or "other")
            (gpu_ranges if cat.startswith("gpu") else cpu_ranges).append(span)
        elif cat in _LAUNCH_CATS and corr is not None:
            launches[corr] = float(ev["ts"])
        elif cat in _DEVICE_CATS:
            device.append((name, float(ev.get("ts", 0)), float(ev.get("dur", 0)), corr))

    def lookup(ranges, t):
        for start, end, part, phase in ranges:
            if start <= t <= end:
                return part, phase
        return None

    out = []
    for name, ts, us, corr in device:
        launch = launches.get(corr)
        where = lookup(cpu_ranges, launch) if launch is not None else lookup(gpu_ranges, ts)
        out.append(KernelEvent(*(where or ("other", "other")), name, us))
    return out


def group_kernels(kernels: list[KernelEvent]) -> dict:
    """``{(part, kind): {"count", "forward", "backward", "optimizer", "other", "total"}}`` in ms."""
    groups: dict = {}
    for k in kernels:
        g = groups.setdefault((k.part, kernel_kind(k.name)),
                              {"count": 0, **{ph: 0.0 for ph in PHASES}, "other": 0.0, "total": 0.0})
        g["count"] += 1
        g[k.phase if k.phase in PHASES else "other"] += k.us / 1e3
        g["total"] += k.us / 1e3
    return groups


def top_kernels(kernels: list[KernelEvent], part: str, n: int = 5) -> list[dict]:
    """The ``n`` kernels of ``part`` with the most GPU time: name (shortened), kind, count, ms."""
    by: dict = {}
    for k in kernels:
        if k.part == part:
            c, ms = by.get(k.name, (0, 0.0))
            by[k.name] = (c + 1, ms + k.us / 1e3)
    top = sorted(by.items(), key=lambda kv: -kv[1][1])[:n]
    return [{"name": name[:90], "kind": kernel_kind(name), "count": c, "ms": ms} for name, (c, ms) in top]


# ---------------------------------------------------------------------------- floors
def kind_bytes(dims: flops.ModelDims, batch: int, mask_ratio: float, *, act_bytes: int, params: dict,
               encoder_mask_tokens: bool = False, masked_pred_only: bool = False) -> dict:
    """Bytes one training step must move, per part and memory-bound kind: the floor model.

    Each pass reads its inputs once and writes its outputs once (L2 reuse and fusion across
    kinds not counted). The residual stream and the parameters are fp32 (4 bytes); activations
    that feed a matmul are ``act_bytes`` (2 under bf16/fp16 autocast, 4 in fp32). Per block of
    ``R = batch x tokens`` rows, width ``D``, MLP width ``H``:

    - norm: the two residual-add + LayerNorm passes, forward reads x, y and writes h, out;
      backward reads dout, dh, h and writes dx, dy: ``2 (5*4 + 4a) R D``; the stack's first
      LayerNorm ``(3*4 + 2a) R D``;
    - elementwise: bias + GELU, forward 2 and backward 3 passes over ``R H`` at ``a`` bytes, and
      the qkv bias gradient (one read of ``R x 3D``);
    - optimizer: AdamW reads param, grad, both moments and writes param and moments, fp32:
      28 bytes per trainable parameter;
    - copy/other: under autocast the cast of every matmul parameter to the autocast dtype and of
      its gradient back (12 bytes per parameter); the encoder's patch gather and embedding
      epilogue, the decoder's un-shuffle and the loss (forward and backward).

    ``params``: ``{part: {"trainable": n, "matmul": n}}`` (matmul = the Linear / conv layers')."""
    L, P, C = dims.num_patches, dims.patch_size, dims.in_chans
    K = int(L * (1 - mask_ratio))
    a, r, cpp = act_bytes, 4, P * P * C
    cast = 12 if a < 4 else 0
    tok = {"encoder": 1 + (L if encoder_mask_tokens else K), "decoder": 1 + L}
    width = {"encoder": dims.embed_dim, "decoder": dims.decoder_embed_dim}
    depth = {"encoder": dims.depth, "decoder": dims.decoder_depth}
    out = {}
    for part in PARTS:
        R, D = batch * tok[part], width[part]
        H = int(D * dims.mlp_ratio)
        norm = depth[part] * 2 * (5 * r + 4 * a) * R * D + (3 * r + 2 * a) * R * D
        elementwise = depth[part] * (5 * a * R * H + a * R * 3 * D)
        if part == "encoder":
            embedded = batch * (L if encoder_mask_tokens else K)
            glue = embedded * cpp * (4 + a) + 2 * R * D * (a + r)  # gather; epilogue forward + backward
        else:
            M = L - K if masked_pred_only else L
            enc_rows = batch * tok["encoder"]
            glue = (2 * (enc_rows * D * a + R * D * r)  # un-shuffle forward + backward
                    + batch * M * cpp * (2 * a + 4))  # loss: pred and image read, pred's gradient written
        out[part] = {"norm": norm, "elementwise": elementwise, "optimizer": 28 * params[part]["trainable"],
                     "copy/other": glue + cast * params[part]["matmul"]}
    return out


def kind_floors(dims: flops.ModelDims, batch: int, mask_ratio: float, *, matmul_tflops: float, copy_gbps: float,
                act_bytes: int, params: dict, encoder_mask_tokens: bool = False, visible_patch_embed: bool = False,
                masked_pred_only: bool = False) -> dict:
    """``{part: {kind: (floor ms, basis)}}`` of one training step: the matmul kinds' FLOPs over
    the measured matmul rate (training = 3x the forward's matmuls: forward, input gradient,
    weight gradient; the patch embedding 2x, the images need no gradient), the other kinds'
    bytes (:func:`kind_bytes`) over the measured copy bandwidth."""
    macs = flops.kind_macs(dims, mask_ratio, encoder_mask_tokens=encoder_mask_tokens,
                           visible_patch_embed=visible_patch_embed)
    patch_embed = flops.stage_macs(dims, mask_ratio, encoder_mask_tokens=encoder_mask_tokens,
                                   visible_patch_embed=visible_patch_embed)["patch_embed"]
    nbytes = kind_bytes(dims, batch, mask_ratio, act_bytes=act_bytes, params=params,
                        encoder_mask_tokens=encoder_mask_tokens, masked_pred_only=masked_pred_only)
    rate = matmul_tflops * 1e12 / 1e3  # FLOPs per ms
    bw = copy_gbps * 1e9 / 1e3  # bytes per ms
    out = {}
    for part in PARTS:
        gemm = 3 * macs[part]["gemm"] - (patch_embed if part == "encoder" else 0)
        out[part] = {"GEMM": (2 * batch * gemm / rate, "FLOPs"),
                     "attention": (2 * batch * 3 * macs[part]["attention"] / rate, "FLOPs"),
                     **{kind: (b / bw, "bytes") for kind, b in nbytes[part].items()}}
    return out


def param_counts(model) -> dict:
    """``{part: {"trainable": n, "matmul": n}}``: trainable parameters, and those of the Linear /
    conv layers (the ones autocast casts for their matmul)."""
    counts = {part: {"trainable": 0, "matmul": 0} for part in PARTS}
    matmul = {f"{m}.{n}" if m else n for m, mod in model.named_modules()
              if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) for n, _ in mod.named_parameters(recurse=False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[part_of(name)]["trainable"] += p.numel()
            if name in matmul:
                counts[part_of(name)]["matmul"] += p.numel()
    return counts


def kernel_rows(groups: dict, floors: dict, step_ms: float) -> list[dict]:
    """The table of :func:`kernel_profile`: one row per part and kind (and per part ``all``),
    each with its GPU ms per phase, share of the step's GPU time, floor and ratio to it."""
    rows = []
    parts = list(PARTS) + sorted({p for p, _ in groups} - set(PARTS))
    for part in parts:
        part_rows = []
        for kind in KINDS:
            g = groups.get((part, kind))
            floor_ms, basis = floors.get(part, {}).get(kind, (None, None))
            if g is None and floor_ms is None:
                continue
            g = g or {"count": 0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0, "other": 0.0, "total": 0.0}
            part_rows.append({"part": part, "kind": kind, "kernels": g["count"], "forward_ms": g["forward"],
                              "backward_ms": g["backward"], "optimizer_ms": g["optimizer"], "gpu_ms": g["total"],
                              "share": g["total"] / step_ms if step_ms else 0.0, "floor_ms": floor_ms,
                              "floor_basis": basis,
                              "x_floor": g["total"] / floor_ms if floor_ms else None})
        if not part_rows:
            continue
        total = {k: sum(r[k] for r in part_rows) for k in ("kernels", "forward_ms", "backward_ms", "optimizer_ms",
                                                            "gpu_ms", "share")}
        floor = sum(r["floor_ms"] for r in part_rows if r["floor_ms"] is not None)
        rows += part_rows + [{"part": part, "kind": "all", **total, "floor_ms": floor or None, "floor_basis": "sum",
                              "x_floor": total["gpu_ms"] / floor if floor else None}]
    return rows


def kernel_profile(model, imgs, mask_ratio: float = 0.75, *, warmup: int = 2, dtype=None, noise=None) -> dict:
    """GPU time of one training step's kernels (after ``warmup`` steps), by part and kind,
    beside the floors (:func:`kind_floors`) computed from the matmul rate and copy bandwidth
    measured in the same run. Runs :func:`split_step` under ``torch.profiler``; needs CUDA."""
    device = imgs.device
    if device.type != "cuda":
        raise ValueError(f"the kernel profile needs CUDA (GPU kernel times from torch.profiler); imgs are on {device}")
    if noise is None:
        noise = torch.rand(imgs.shape[0], model.num_patches, device=device)
    opts = part_optimizers(model)
    autocast = partial(torch.autocast, "cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext
    for _ in range(warmup):
        split_step(model, imgs, mask_ratio, noise, opts, autocast())
    torch.cuda.synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        split_step(model, imgs, mask_ratio, noise, opts, autocast())
        torch.cuda.synchronize(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    kernels = attribute_kernels(events)
    step_ms = sum(k.us for k in kernels) / 1e3
    matmul_dtype = dtype or torch.float32
    rates = {"matmul_tflops": bench.measure_matmul_tflops(device, matmul_dtype),
             "copy_gbps": bench.measure_copy_gbps(device)}
    dims = flops.ModelDims.of(model)
    act_bytes = torch.empty((), dtype=matmul_dtype).element_size()
    floors = kind_floors(dims, imgs.shape[0], mask_ratio, **rates, act_bytes=act_bytes,
                         params=param_counts(model), encoder_mask_tokens=model.encoder_mask_tokens,
                         visible_patch_embed=_embeds_visible_only(model, imgs, mask_ratio, noise),
                         masked_pred_only=model.pred_masked_only)
    return {"batch_size": imgs.shape[0], "mask_ratio": mask_ratio, "dtype": str(dtype or torch.float32),
            "backend": model.backend, "gpu": torch.cuda.get_device_name(device), **rates,
            "step_gpu_ms": step_ms, "kernels": len(kernels),
            "rows": kernel_rows(group_kernels(kernels), floors, step_ms),
            "top_kernels": {part: top_kernels(kernels, part) for part in PARTS}}


def format_kernel_profile(result: dict, title: str) -> str:
    lines = [title,
             f"GPU time of one step: {result['step_gpu_ms']:.2f} ms in {result['kernels']} kernels; floors from "
             f"matmul {result['matmul_tflops']:.0f} TFLOP/s and copy {result['copy_gbps']:.0f} GB/s measured now",
             f"{'part':<9}{'kind':<13}{'kernels':>8}{'fwd ms':>9}{'bwd ms':>9}{'opt ms':>8}{'total ms':>10}"
             f"{'share':>8}{'floor ms':>10}{'x floor':>9}  floor from"]
    for r in result["rows"]:
        floor = "-" if r["floor_ms"] is None else f"{r['floor_ms']:.2f}"
        ratio = "-" if r["x_floor"] is None else f"{r['x_floor']:.1f}x"
        lines.append(f"{r['part']:<9}{r['kind']:<13}{r['kernels']:>8}{r['forward_ms']:>9.2f}{r['backward_ms']:>9.2f}"
                     f"{r['optimizer_ms']:>8.2f}{r['gpu_ms']:>10.2f}{100 * r['share']:>7.1f}%{floor:>10}{ratio:>9}"
                     f"  {r['floor_basis'] or ''}")
    for part, top in result.get("top_kernels", {}).items():
        if top:
            lines.append(f"{part}'s top kernels: " + "; ".join(f"{t['name'][:60]} ({t['kind']}, {t['count']}x) "
                                                                 f"{t['ms']:.2f} ms" for t in top))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- decoder ablation
DECODER_DEPTHS = (1, 2, 4, 8, 12)  # the paper's Table 1(a), at the default width
DECODER_WIDTHS = (128, 256, 512, 768, 1024)  # Table 1(b), at the default depth


def model_with_decoder(name: str, depth: int, width: int, **kwargs):
    """The registry's model ``name`` with a decoder of ``depth`` blocks, ``width`` wide (its
    decoder heads kept: the authors' 16, at head dim ``width / 16``); everything else as the
    factory builds it. ``kwargs`` are constructor arguments (``img_size``, ``backend``, ...)."""
    return models_mae.create_model(name, decoder_depth=depth, decoder_embed_dim=width, **kwargs)


def _ablation_point(name, depth, width, *, img_size, batch_size, mask_ratio, device, dtype, warmup, repeats,
                    backend) -> dict:
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds saved per point on a GPU
        model = model_with_decoder(name, depth, width, img_size=img_size, backend=backend)
    imgs = torch.randn(batch_size, model.in_chans, *model.patch_embed.img_size, device=device)
    noise = torch.rand(batch_size, model.num_patches, device=device)
    opts = part_optimizers(model)
    clock = _Clock(device)
    autocast = partial(torch.autocast, "cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext
    runs = []
    for i in range(warmup + repeats):
        marks = {}
        split_step(model, imgs, mask_ratio, noise, opts, autocast(), mark=lambda k: marks.__setitem__(k, clock.mark()))
        if clock.cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            runs.append(split_spans(marks, clock))
    steps = [r["step"] for r in runs]
    med = statistics.median(steps)
    dims = flops.ModelDims.of(model)
    macs = flops.summarize(flops.stage_macs(dims, mask_ratio, visible_patch_embed=_embeds_visible_only(
        model, imgs, mask_ratio, noise)))
    enc_tok, dec_tok = flops.per_token_macs(dims)
    return {"decoder_depth": depth, "decoder_width": width, "step_ms_median": med, "step_ms_min": min(steps),
            "step_ms_max": max(steps), "spread": bench.spread(med, min(steps), max(steps)),
            "images_per_s": batch_size / med * 1e3,
            "decoder_time_share": statistics.median(r["decoder"] / (r["encoder"] + r["decoder"]) for r in runs),
            "decoder_flops_share": macs.decoder_gflops / macs.total_gflops,
            "decoder_per_token_flops": dec_tok / enc_tok,
            "warning": bench.spread_warning(f"decoder {depth}x{width}", med, min(steps), max(steps))}


def decoder_ablation(name: str, *, img_size: int = 224, batch_size: int, mask_ratio: float = 0.75, device="cpu",
                     dtype=None, warmup: int = 1, repeats: int = 3, depths=DECODER_DEPTHS, widths=DECODER_WIDTHS,
                     backend: str = "auto", progress=None) -> dict:
    """The paper's decoder-design ablation in wall-clock: a depth sweep at the model's decoder
    width and a width sweep at its decoder depth (the 8 x 512 point, in both, is measured once).
    Each point is a fresh model (same encoder) timed over ``repeats`` :func:`split_step` s after
    ``warmup``: step time (forward, backward, AdamW) with its min and max, the decoder's share of
    the forward + backward time (decoder_embed, un-shuffle, blocks, head and loss; the optimizer
    left out) beside its share of the FLOPs, and the decoder's FLOPs per token over the encoder's
    (the paper's "9%" of the 8 x 512 decoder against ViT-L)."""
    device = torch.device(device)
    with torch.device("meta"):
        ref = models_mae.create_model(name, img_size=img_size)
    base_depth, base_width = len(ref.decoder_blocks), ref.mask_token.shape[-1]
    run_point = partial(_ablation_point, name, img_size=img_size, batch_size=batch_size, mask_ratio=mask_ratio,
                        device=device, dtype=dtype, warmup=warmup, repeats=repeats, backend=backend)
    cache: dict = {}

    def point(depth, width):
        if (depth, width) not in cache:
            if progress:
                progress(f"decoder {depth} x {width}")
            cache[depth, width] = run_point(depth, width)
        return cache[depth, width]

    out = {"model": name, "batch_size": batch_size, "mask_ratio": mask_ratio, "base_depth": base_depth,
           "base_width": base_width, "depth": [point(d, base_width) for d in depths],
           "width": [point(base_depth, w) for w in widths]}
    out["warnings"] = [p["warning"] for p in cache.values() if p["warning"]]
    return out


def format_ablation(result: dict) -> str:
    lines = [f"decoder ablation ({result['model']}, batch {result['batch_size']}, mask ratio {result['mask_ratio']}): "
             f"step = fwd + bwd + AdamW; decoder share of fwd + bwd time beside its share of FLOPs"]
    for sweep, key, fixed in (("depth", "decoder_depth", f"width {result['base_width']}"),
                              ("width", "decoder_width", f"depth {result['base_depth']}")):
        lines.append(f"{'decoder ' + sweep:<16}{'step ms (min-max)':>24}{'img/s':>9}{'time share':>12}"
                     f"{'FLOPs share':>13}{'FLOPs/token':>13}   ({fixed})")
        for p in result[sweep]:
            flag = "!" if p["warning"] else " "
            rng = f"{p['step_ms_median']:.1f} ({p['step_ms_min']:.1f}-{p['step_ms_max']:.1f}){flag}"
            lines.append(f"{p[key]:<16}{rng:>24}{p['images_per_s']:>9.1f}{100 * p['decoder_time_share']:>11.1f}%"
                         f"{100 * p['decoder_flops_share']:>12.1f}%{100 * p['decoder_per_token_flops']:>12.1f}%")
    lines += [f"WARNING {w}" for w in result.get("warnings", [])]
    return "\n".join(lines)
