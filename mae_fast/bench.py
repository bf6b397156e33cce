"""Training-step throughput of MAE, our backends and the peers side by side, in one run.

One row per variant, all on the same weights and the same synthetic batch resident on the
device: a step is forward + backward + AdamW step. Each row is warmed up (compilation and first
calls are never timed; the warm-up's wall clock is reported apart, so a row that compiles shows
its compile time), then each step is timed alone (CUDA events on a GPU, a synchronised wall
clock on the CPU); the median is reported with min and max, and a row whose spread
``(max - min) / median`` exceeds :data:`SPREAD_LIMIT` is flagged with a warning (a busy machine,
not the code, is the usual cause). Rows that cannot run here (the HF peer without transformers,
compile on a CPU by default, CUDA graphs without CUDA) stay in the table with the reason.

The rows (:data:`VARIANTS`):

- ``torch``: the reference backend; ``auto``: our kernels (the reference on CPU);
- ``auto+regional``: ``auto`` with :meth:`MaskedAutoencoderViT.compile_blocks` (each transformer
  block compiled once, the encoder's and the decoder's blocks each sharing one graph): seconds
  of compile, where ``auto+compile`` (``torch.compile`` of the whole model) takes a minute or more;
- ``auto+graphs``: ``auto`` with the whole step (forward, backward, AdamW with
  ``capturable=True``) captured once in a CUDA graph and replayed (:class:`CapturedStep`);
- ``encoder_mask_tokens``: the paper's ablation (the encoder sees every patch);
- ``hf_eager``, ``hf_sdpa``: HuggingFace's ``ViTMAEForPreTraining``; ``hf_sdpa+compile``: the
  fair peer of the compiled rows (the HF model under ``torch.compile``).
"""
from __future__ import annotations

import contextlib
import gc
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable

import torch

from . import flops, hf, models_mae

VARIANTS = ("torch", "auto", "auto+regional", "auto+graphs", "auto+compile", "encoder_mask_tokens",
            "hf_eager", "hf_sdpa", "hf_sdpa+compile")
COMPILED = ("auto+regional", "auto+compile", "hf_sdpa+compile")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPREAD_LIMIT = 0.2  # (max - min) / median of a row's step times above this: the row is flagged
ADAMW = {"lr": 1.5e-4, "betas": (0.9, 0.95), "weight_decay": 0.05}  # the authors' recipe


@dataclass
class BenchConfig:
    model: str = "mae_vit_tiny_patch16"
    img_size: int = 224
    batch_size: int = 16
    mask_ratio: float = 0.75
    dtype: str = "fp32"  # autocast dtype on a GPU; fp32 = no autocast
    device: str = "cpu"
    warmup: int = 2
    repeats: int = 5
    variants: tuple[str, ...] = VARIANTS
    compile_on_cpu: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend for the compiled rows ("eager": trace only)

    def __post_init__(self):
        check_config(self, models_mae.MODELS, VARIANTS)
        if self.img_size < 1:
            raise ValueError(f"img_size must be a positive multiple of the patch size, got {self.img_size}")


def check_config(cfg, models: dict, variants: tuple) -> None:
    """What every benchmark configuration must hold (pretraining's and fine-tuning's): a known
    model, dtype and variants, positive counts, autocast only on CUDA."""
    if cfg.model not in models:
        raise ValueError(f"model must be one of {sorted(models)}, got {cfg.model!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    bad = [v for v in cfg.variants if v not in variants]
    if bad:
        raise ValueError(f"variants must be among {variants}, got {bad}")
    if cfg.batch_size < 1 or cfg.warmup < 0 or cfg.repeats < 1:
        raise ValueError("batch_size and repeats must be >= 1, warmup >= 0")
    if cfg.dtype != "fp32" and not cfg.device.startswith("cuda"):
        raise ValueError(f"dtype={cfg.dtype!r} (autocast) is for CUDA; use fp32 on {cfg.device}")


@dataclass
class Row:
    variant: str
    status: str = "ok"  # "ok", or why it did not run
    images_per_s: float | None = None
    step_ms_median: float | None = None
    step_ms_min: float | None = None
    step_ms_max: float | None = None
    peak_mem_gb: float | None = None
    train_gflops_per_image: float | None = None
    mfu: float | None = None
    speedup_vs_torch: float | None = None
    speedup_vs_hf: float | None = None
    loss: float | None = None
    spread: float | None = None  # (max - min) / median of the step times
    warmup_s: float | None = None  # wall clock of the untimed warm-up (compile / capture included)
    compile_s: float | None = None  # of which beyond steady-state steps: the compile (capture) time


@dataclass
class BenchResult:
    config: dict
    env: dict
    matmul_tflops: float
    flops: dict
    rows: list[Row] = field(default_factory=list)
    mask_token_speedup: float | None = None
    compiled_vs_hf_compiled: dict = field(default_factory=dict)  # {row: img/s over hf_sdpa+compile's}
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


# ---------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], device: torch.device, warmup: int, repeats: int,
               warmup_times: list | None = None) -> list[float]:
    """Seconds per call of ``step``, each timed alone after ``warmup`` untimed calls (whose wall
    clock, synchronised, is appended to ``warmup_times`` when given)."""
    for _ in range(warmup):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        if warmup_times is not None:
            warmup_times.append(time.perf_counter() - t0)
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The card's (or CPU's) dense matmul rate on random data, measured now: the MFU ceiling."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_steps(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def measure_copy_gbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth measured now, bytes read + written per second / 1e9: the
    ceiling of the memory-bound kernels (1 GiB on a GPU, 64 MiB on a CPU)."""
    n = (1 << 29) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.float16 if device.type == "cuda" else torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    times = time_steps(lambda: dst.copy_(src), device, warmup=3, repeats=10)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e9


def spread(median: float, lo: float, hi: float) -> float:
    """``(max - min) / median``: how far apart a measurement's steps are."""
    return (hi - lo) / median if median > 0 else 0.0


def spread_warning(label: str, median_ms: float, min_ms: float, max_ms: float,
                   limit: float = SPREAD_LIMIT) -> str | None:
    """A warning for a measurement whose steps spread more than ``limit`` (None when they do not):
    a busy machine (another process on the CPU, a shared or throttling GPU) reads as a slow
    point, so such a figure must be rerun before it is quoted."""
    s = spread(median_ms, min_ms, max_ms)
    if s <= limit:
        return None
    return (f"{label}: step times spread {100 * s:.0f}% ({min_ms:.1f}-{max_ms:.1f} ms around {median_ms:.1f}, "
            f"over the {100 * limit:.0f}% limit): a busy machine or an unsteady row; rerun before quoting it")


def make_optimizer(params, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW with the authors' recipe (:data:`ADAMW`); ``capturable`` keeps its step counter on the
    device so that the step can be captured in a CUDA graph."""
    return torch.optim.AdamW(params, **ADAMW, capturable=capturable)


def capture_graph(fn: Callable[[], object], warmup: int = 3, timings: dict | None = None):
    """``fn`` captured in a CUDA graph, after ``warmup`` calls on a side stream as capture requires
    (lazy initialisation -- cuBLAS handles, optimizer state, compiled kernels -- must not happen
    inside it): returns ``(graph, what the captured call returned)``; ``graph.replay()`` launches
    the same kernels on the same memory with no Python in between. ``timings``, when given,
    receives the seconds of the warm-up calls and of the capture (``warmup_s``, ``capture_s``)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    t0 = time.perf_counter()
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    graph = torch.cuda.CUDAGraph()
    # Our own stream context around the capture: if the capture fails, the stream that was
    # current before is restored even though torch.cuda.graph's exit raised first.
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        out = fn()
    if timings is not None:
        timings.update(warmup_s=t1 - t0, capture_s=time.perf_counter() - t1)
    return graph, out


class CapturedStep:
    """A whole training step (forward, backward, optimizer step) of one fixed batch shape,
    captured once in a CUDA graph and replayed: the harness's ``auto+graphs`` row, and usable in
    a training loop of fixed batch size and mask ratio::

        opt = bench.make_optimizer(model.parameters(), capturable=True)
        step = bench.CapturedStep(lambda imgs: model(imgs, mask_ratio=0.75)[0], opt, (first_batch,))
        for imgs in loader:        # same shape every step (drop_last=True)
            loss = step(imgs)      # copies imgs into the static buffer, replays; loss is static too

    MAE's shapes are static for a fixed batch and mask ratio (``int(L * (1 - ratio))`` kept
    patches every step), so one capture serves every step. As torch's recipe for whole-network
    capture asks: the optimizer is built with ``capturable=True`` (step count and bias corrections
    on the device); warm-up steps run on a side stream first; the grads are set to None before
    the captured step so that backward allocates them from the graph's pool and every replay
    writes (not accumulates) them. ``loss_fn`` runs any autocast itself, with
    ``cache_enabled=False`` (autocast's cast cache must not outlive a capture).

    Random masking: with no ``noise`` the model draws it with ``torch.rand`` inside forward.
    That is graph-safe: CUDA's philox generator is captured with its offset read from device
    memory, and each replay advances the generator by the offsets the capture consumed (PyTorch's
    Note [CUDA Graph-safe RNG states], ``aten/src/ATen/CUDAGeneratorImpl.h``), so every replay
    draws a fresh mask, as an eager step would. A step that syncs with the host (``.item()``,
    ``MAE_FAST_CHECK_IDS=1``) cannot be captured: construction raises.
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer, inputs: tuple,
                 warmup: int = 3):
        if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs):
            raise RuntimeError("needs CUDA (CUDA graph capture): the inputs must be CUDA tensors")
        self.static_inputs = tuple(t.clone() for t in inputs)
        self.losses: list[torch.Tensor] = []
        self.timings: dict = {}  # warmup_s (the eager warm-up steps), capture_s

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(*self.static_inputs)
            loss.backward()
            optimizer.step()
            self.losses.append(loss.detach())
            return loss.detach()

        self.graph, self.loss = capture_graph(step, warmup=max(1, warmup), timings=self.timings)

    def __call__(self, *inputs) -> torch.Tensor:
        for static, new in zip(self.static_inputs, inputs):
            if new is not static:
                static.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.loss


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       timeout=5, cwd=__file__.rsplit("/", 2)[0]).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


# ---------------------------------------------------------------------------- the variants
def build_variant(name: str, base: models_mae.MaskedAutoencoderViT, cfg: BenchConfig):
    """(model, forward(imgs, noise) -> loss) for a variant, carrying ``base``'s weights; raises
    ``RuntimeError`` with the reason when the variant cannot run here."""
    device = torch.device(cfg.device)
    factory = partial(models_mae.create_model, cfg.model, img_size=cfg.img_size)
    if name in COMPILED and device.type == "cpu" and not cfg.compile_on_cpu:
        raise RuntimeError("skipped on CPU (minutes of compile): pass --compile-on-cpu")
    if name == "auto+graphs" and device.type != "cuda":
        raise RuntimeError("needs CUDA (CUDA graph capture of the whole step)")
    compile_ = partial(torch.compile, backend=cfg.compile_backend)
    if name in ("torch", "auto", "auto+regional", "auto+graphs", "auto+compile", "encoder_mask_tokens"):
        backend = "torch" if name == "torch" else "auto"
        model = factory(backend=backend, encoder_mask_tokens=name == "encoder_mask_tokens")
        model.load_state_dict(base.state_dict(), strict=False)  # the ablation's extra token stays fresh
        model.to(device)
        fwd = model
        if name == "auto+compile":
            fwd = compile_(model)
        elif name == "auto+regional":
            model.compile_blocks(backend=cfg.compile_backend)
        return model, lambda imgs, noise: fwd(imgs, mask_ratio=cfg.mask_ratio, noise=noise)[0]
    if name in ("hf_eager", "hf_sdpa", "hf_sdpa+compile"):
        try:
            import transformers
        except ImportError:
            raise RuntimeError("transformers is not installed (pip install mae_fast[bench])") from None
        config = transformers.ViTMAEConfig(**hf.hf_config_kwargs(base), mask_ratio=cfg.mask_ratio)
        config._attn_implementation = name.removeprefix("hf_").removesuffix("+compile")
        model = transformers.ViTMAEForPreTraining(config)
        model.load_state_dict(hf.to_hf(base.state_dict(), hf.detect_scheme(model.state_dict())), strict=True)
        model.to(device)
        fwd = compile_(model) if name.endswith("+compile") else model
        return model, lambda imgs, noise: fwd(pixel_values=imgs, noise=noise).loss
    raise ValueError(f"unknown variant {name!r}")


def autocast(cfg: BenchConfig, cache_enabled: bool = True):
    """The row's autocast context (none for fp32)."""
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=DTYPES[cfg.dtype], cache_enabled=cache_enabled)


def _captured(forward, opt, cfg: BenchConfig, imgs, noise):
    """The :class:`CapturedStep` of the ``auto+graphs`` row; a RuntimeError saying why when the
    step cannot be captured."""
    def loss_fn(imgs_, noise_):
        with autocast(cfg, cache_enabled=False):
            return forward(imgs_, noise_)

    try:
        step = CapturedStep(loss_fn, opt, (imgs, noise))
    except Exception as err:  # noqa: BLE001 -- whatever broke the capture, the row says it and the run goes on
        first = (str(err).strip().splitlines() or [""])[0][:240]
        raise RuntimeError(f"capture failed, not timed ({type(err).__name__}: {first}); "
                           f"the auto row is this step uncaptured") from err
    return step


def run_row(name: str, base, cfg: BenchConfig, imgs, noise, train_gflops: float, matmul_tflops: float) -> Row:
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup_times: list[float] = []
    try:
        model, forward = build_variant(name, base, cfg)
        opt = make_optimizer(model.parameters(), capturable=name == "auto+graphs")
        if name == "auto+graphs":
            captured = _captured(forward, opt, cfg, imgs, noise)
            losses = captured.losses
            warmup_times += captured.timings.values()  # its eager warm-up steps and the capture

            def step():
                captured(imgs, noise)
        else:
            losses = []

            def step():
                with autocast(cfg):
                    loss = forward(imgs, noise)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.detach())
        times = time_steps(step, device, cfg.warmup, cfg.repeats, warmup_times)
    except RuntimeError as err:
        return Row(name, status=str(err))
    med = statistics.median(times)
    row = Row(name, images_per_s=cfg.batch_size / med, step_ms_median=med * 1e3, step_ms_min=min(times) * 1e3,
              step_ms_max=max(times) * 1e3, train_gflops_per_image=train_gflops, loss=float(losses[0]),
              spread=spread(med, min(times), max(times)), warmup_s=sum(warmup_times))
    if name in COMPILED:  # the warm-up beyond as many steady-state steps: the compilation
        row.compile_s = max(0.0, row.warmup_s - cfg.warmup * med)
    elif name == "auto+graphs":
        row.compile_s = captured.timings["capture_s"]
    row.mfu = train_gflops * 1e9 * row.images_per_s / (matmul_tflops * 1e12)
    if device.type == "cuda":
        row.peak_mem_gb = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return row


def run(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchResult:
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    base = models_mae.create_model(cfg.model, img_size=cfg.img_size)
    dims = flops.ModelDims.of(base)
    plain = flops.summarize(flops.stage_macs(dims, cfg.mask_ratio))
    ablation = flops.summarize(flops.stage_macs(dims, cfg.mask_ratio, encoder_mask_tokens=True))
    img = base.patch_embed.img_size
    imgs = torch.randn(cfg.batch_size, base.in_chans, *img, device=device)
    noise = torch.rand(cfg.batch_size, base.num_patches, device=device)  # one mask for every row
    matmul_dtype = DTYPES[cfg.dtype] if device.type == "cuda" and cfg.dtype != "fp32" else torch.float32
    result = BenchResult(config=asdict(cfg), env=environment(device),
                         matmul_tflops=measure_matmul_tflops(device, matmul_dtype),
                         flops={"without_mask_tokens": plain.to_dict(), "with_mask_tokens": ablation.to_dict()})
    for name in cfg.variants:
        if progress:
            progress(name)
        # training ~ 3x forward FLOPs (backward = 2x forward)
        train_gflops = 3 * (ablation if name == "encoder_mask_tokens" else plain).total_gflops
        row = run_row(name, base, cfg, imgs, noise, train_gflops, result.matmul_tflops)
        result.rows.append(row)
        if row.status == "ok":
            warning = spread_warning(name, row.step_ms_median, row.step_ms_min, row.step_ms_max)
            if warning:
                result.warnings.append(warning)
        gc.collect()  # the row's model and optimizer state are garbage now: free them before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _add_ratios(result)
    return result


def _add_ratios(result: BenchResult) -> None:
    by_name = {r.variant: r for r in result.rows if r.status == "ok"}
    base, peer = by_name.get("torch"), by_name.get("hf_sdpa") or by_name.get("hf_eager")
    for r in by_name.values():
        if base:
            r.speedup_vs_torch = r.images_per_s / base.images_per_s
        if peer:
            r.speedup_vs_hf = r.images_per_s / peer.images_per_s
    ablation = by_name.get("encoder_mask_tokens")
    fast = by_name.get("auto")
    if ablation and fast:
        result.mask_token_speedup = fast.images_per_s / ablation.images_per_s
    hf_compiled = by_name.get("hf_sdpa+compile")
    if hf_compiled:  # the fair comparison of the compiled rows: against the compiled peer
        result.compiled_vs_hf_compiled = {n: by_name[n].images_per_s / hf_compiled.images_per_s
                                          for n in ("auto+regional", "auto+graphs", "auto+compile") if n in by_name}


# ---------------------------------------------------------------------------- reporting
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: BenchResult) -> str:
    cfg, env = result.config, result.env
    where = env.get("gpu") or f"CPU ({env['processor']}, {env['threads']} threads)"
    lines = [
        f"mae-fast bench: {cfg['model']} at {cfg['img_size']} px, batch {cfg['batch_size']}, mask ratio {cfg['mask_ratio']}, "
        f"{cfg['dtype']}, on {where}",
        f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; "
        f"matmul rate measured now: {result.matmul_tflops:.2f} TFLOP/s (MFU is model FLOPs over it); "
        f"median of {cfg['repeats']} steps after {cfg['warmup']} warm-up (fwd+bwd+AdamW)",
        "",
        f"{'variant':<22}{'img/s':>10}{'step ms (min-max)':>25}{'vs torch':>10}{'vs HF':>8}{'MFU':>8}{'mem GB':>8}"
        f"{'warm-up s':>11}",
    ]
    for r in result.rows:
        if r.status != "ok":
            lines.append(f"{r.variant:<22}  {r.status}")
            continue
        lines.append(f"{r.variant:<22}{r.images_per_s:>10.1f}{_range_ms(r):>25}{_fmt(r.speedup_vs_torch, '.2f'):>9}x"
                     f"{_fmt(r.speedup_vs_hf, '.2f'):>7}x{_fmt(r.mfu and 100 * r.mfu, '.1f'):>7}%"
                     f"{_fmt(r.peak_mem_gb, '.2f'):>8}{_fmt(r.warmup_s, '.1f'):>11}")
    f0, f1 = result.flops["without_mask_tokens"], result.flops["with_mask_tokens"]
    lines += [
        "",
        f"forward GFLOPs per image (matmuls): without mask tokens {f0['total_gflops']:.2f} "
        f"(encoder {f0['encoder_gflops']:.2f}, decoder {f0['decoder_gflops']:.2f}); with mask tokens in the "
        f"encoder {f1['total_gflops']:.2f} -> {f1['total_gflops'] / f0['total_gflops']:.2f}x fewer FLOPs",
    ]
    if result.mask_token_speedup is not None:
        lines.append(f"measured wall-clock speedup from dropping mask tokens (auto vs encoder_mask_tokens): "
                     f"{result.mask_token_speedup:.2f}x")
    setup = [f"{r.variant} {r.compile_s:.1f} s" for r in result.rows if r.status == "ok" and r.compile_s is not None]
    if setup:
        lines.append("compile time (warm-up beyond steady-state steps; for auto+graphs the capture): "
                     + ", ".join(setup))
    if result.compiled_vs_hf_compiled:
        lines.append("against the compiled peer hf_sdpa+compile: " + ", ".join(
            f"{n} {v:.2f}x" for n, v in result.compiled_vs_hf_compiled.items()))
    lines += [f"WARNING {w}" for w in result.warnings]
    return "\n".join(lines)


def _range_ms(r) -> str:
    """``median (min-max)`` of a row's step ms, ``!`` when the spread is past :data:`SPREAD_LIMIT`."""
    flag = "!" if r.spread is not None and r.spread > SPREAD_LIMIT else " "
    return f"{r.step_ms_median:.1f} ({r.step_ms_min:.1f}-{r.step_ms_max:.1f}){flag}"


# ---------------------------------------------------------------------------- sweeps
def _progress(items, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, leave=False)
    except ImportError:
        return items


def _sweep_point(cfg: BenchConfig) -> dict:
    """A sweep's many points get half the timed steps of the main table (the curve's shape, not
    each point's last digit, is what a sweep shows)."""
    return {"warmup": min(cfg.warmup, 2), "repeats": max(3, cfg.repeats // 2)}


def _point(res: BenchResult, label: str) -> dict:
    """A sweep point's per-row figures (median img/s and the step ms median, min, max, spread)
    and its spread warnings, labelled with the point."""
    rows = {r.variant: {"images_per_s": r.images_per_s, "step_ms_median": r.step_ms_median,
                        "step_ms_min": r.step_ms_min, "step_ms_max": r.step_ms_max, "spread": r.spread}
            for r in res.rows if r.status == "ok"}
    return {"rows": rows, "warnings": [f"{label}, {w}" for w in res.warnings]}


def sweep_mask_ratio(cfg: BenchConfig, ratios) -> list[dict]:
    """Throughput with and without mask tokens in the encoder, per mask ratio, beside the FLOPs
    ratio: how much of the FLOPs saving turns into wall-clock."""
    out = []
    for ratio in _progress(list(ratios), "mask ratios"):
        sub = BenchConfig(**{**asdict(cfg), **_sweep_point(cfg), "mask_ratio": ratio,
                             "variants": ("auto", "encoder_mask_tokens")})
        res = run(sub)
        rows = {r.variant: r for r in res.rows}
        f0 = res.flops["without_mask_tokens"]["total_gflops"]
        f1 = res.flops["with_mask_tokens"]["total_gflops"]
        out.append({"mask_ratio": ratio, "images_per_s": rows["auto"].images_per_s,
                    "images_per_s_with_mask_tokens": rows["encoder_mask_tokens"].images_per_s,
                    "speedup": res.mask_token_speedup, "flops_ratio": f1 / f0,
                    **_point(res, f"mask ratio {ratio}")})
    return out


def sweep_batch_size(cfg: BenchConfig, sizes, variants=("torch", "auto")) -> list[dict]:
    """Throughput per batch size: ``{"batch_size", <variant>: img/s, ..., "rows", "warnings"}``."""
    out = []
    for size in _progress(list(sizes), "batch sizes"):
        res = run(BenchConfig(**{**asdict(cfg), **_sweep_point(cfg), "batch_size": size, "variants": variants}))
        out.append({"batch_size": size, **{r.variant: r.images_per_s for r in res.rows},
                    **_point(res, f"batch {size}")})
    return out


def sweep_warnings(*sweeps) -> list[str]:
    """Every spread warning of the sweeps' points, in order."""
    return [w for sweep in sweeps for point in sweep or () for w in point.get("warnings", ())]
