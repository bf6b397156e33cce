"""Training-step throughput of MAE, our backends and the peers side by side, in one run.

One row per variant, all on the same weights and the same synthetic batch resident on the
device: a step is forward + backward + AdamW step. Each row is warmed up (compilation and first
calls are never timed), then each step is timed alone (CUDA events on a GPU, a synchronised
wall clock on the CPU); the median is reported with min and max. Rows that cannot run here
(the HF peer without transformers, compile on a CPU by default) stay in the table with the
reason, instead of disappearing.
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

VARIANTS = ("torch", "auto", "auto+compile", "encoder_mask_tokens", "hf_eager", "hf_sdpa")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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

    def __post_init__(self):
        if self.model not in models_mae.MODELS:
            raise ValueError(f"model must be one of {sorted(models_mae.MODELS)}, got {self.model!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"variants must be among {VARIANTS}, got {bad}")
        if self.img_size < 1:
            raise ValueError(f"img_size must be a positive multiple of the patch size, got {self.img_size}")
        if self.batch_size < 1 or self.warmup < 0 or self.repeats < 1:
            raise ValueError("batch_size and repeats must be >= 1, warmup >= 0")
        if self.dtype != "fp32" and not self.device.startswith("cuda"):
            raise ValueError(f"dtype={self.dtype!r} (autocast) is for CUDA; use fp32 on {self.device}")


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


@dataclass
class BenchResult:
    config: dict
    env: dict
    matmul_tflops: float
    flops: dict
    rows: list[Row] = field(default_factory=list)
    mask_token_speedup: float | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


# ---------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``step``, each timed alone after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
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
    if name in ("torch", "auto", "auto+compile", "encoder_mask_tokens"):
        backend = "torch" if name == "torch" else "auto"
        model = factory(backend=backend, encoder_mask_tokens=name == "encoder_mask_tokens")
        model.load_state_dict(base.state_dict(), strict=False)  # the ablation's extra token stays fresh
        model.to(device)
        fwd = model
        if name == "auto+compile":
            if device.type == "cpu" and not cfg.compile_on_cpu:
                raise RuntimeError("skipped on CPU (minutes of compile): pass --compile-on-cpu")
            fwd = torch.compile(model)
        return model, lambda imgs, noise: fwd(imgs, mask_ratio=cfg.mask_ratio, noise=noise)[0]
    if name in ("hf_eager", "hf_sdpa"):
        try:
            import transformers
        except ImportError:
            raise RuntimeError("transformers is not installed (pip install mae_fast[bench])") from None
        config = transformers.ViTMAEConfig(**hf.hf_config_kwargs(base), mask_ratio=cfg.mask_ratio)
        config._attn_implementation = name.removeprefix("hf_")
        model = transformers.ViTMAEForPreTraining(config)
        model.load_state_dict(hf.to_hf(base.state_dict(), hf.detect_scheme(model.state_dict())), strict=True)
        model.to(device)
        return model, lambda imgs, noise: model(pixel_values=imgs, noise=noise).loss
    raise ValueError(f"unknown variant {name!r}")


def run_row(name: str, base, cfg: BenchConfig, imgs, noise, train_gflops: float, matmul_tflops: float) -> Row:
    device = torch.device(cfg.device)
    try:
        model, forward = build_variant(name, base, cfg)
    except RuntimeError as err:
        return Row(name, status=str(err))
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    autocast = (torch.autocast("cuda", dtype=DTYPES[cfg.dtype]) if cfg.dtype != "fp32"
                else contextlib.nullcontext())
    losses = []

    def step():
        with autocast:
            loss = forward(imgs, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(step, device, cfg.warmup, cfg.repeats)
    med = statistics.median(times)
    row = Row(name, images_per_s=cfg.batch_size / med, step_ms_median=med * 1e3, step_ms_min=min(times) * 1e3,
              step_ms_max=max(times) * 1e3, train_gflops_per_image=train_gflops, loss=float(losses[0]))
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
        result.rows.append(run_row(name, base, cfg, imgs, noise, train_gflops, result.matmul_tflops))
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
        f"{'variant':<22}{'img/s':>10}{'step ms (min-max)':>24}{'vs torch':>10}{'vs HF':>8}{'MFU':>8}{'mem GB':>8}",
    ]
    for r in result.rows:
        if r.status != "ok":
            lines.append(f"{r.variant:<22}  {r.status}")
            continue
        spread = f"{r.step_ms_median:.1f} ({r.step_ms_min:.1f}-{r.step_ms_max:.1f})"
        lines.append(f"{r.variant:<22}{r.images_per_s:>10.1f}{spread:>24}{_fmt(r.speedup_vs_torch, '.2f'):>9}x"
                     f"{_fmt(r.speedup_vs_hf, '.2f'):>7}x{_fmt(r.mfu and 100 * r.mfu, '.1f'):>7}%"
                     f"{_fmt(r.peak_mem_gb, '.2f'):>8}")
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
    return "\n".join(lines)


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
                    "speedup": res.mask_token_speedup, "flops_ratio": f1 / f0})
    return out


def sweep_batch_size(cfg: BenchConfig, sizes, variants=("torch", "auto")) -> list[dict]:
    out = []
    for size in _progress(list(sizes), "batch sizes"):
        res = run(BenchConfig(**{**asdict(cfg), **_sweep_point(cfg), "batch_size": size, "variants": variants}))
        out.append({"batch_size": size, **{r.variant: r.images_per_s for r in res.rows}})
    return out
