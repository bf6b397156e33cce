"""Fine-tuning step throughput (``mae-fast bench --task finetune``): ``models_vit`` on our backends
beside HuggingFace's ``ViTForImageClassification`` with the same weights, in one run.

A step is forward + cross-entropy on random labels + backward + AdamW, all on one synthetic batch
resident on the device, 224 px, every token (no masking: the encoder's second regime). Both
classify the cls token (``global_pool=False``: HF has no global-pooling head) and neither drops a
path (HF ViT has no stochastic depth), so the rows compute the same function. Rows:

- ``torch``: models_vit on the reference path (SDPA attention, unfused blocks);
- ``auto``: our kernels (fused blocks, the attention extension) where the device has them;
- ``auto+regional``: ``auto`` with ``compile_blocks()`` (on a CPU only with ``--compile-on-cpu``);
- ``hf_sdpa``: ``ViTForImageClassification(attn_implementation="sdpa")``, our weights loaded.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from . import bench, export, models_vit

VARIANTS = ("torch", "auto", "auto+regional", "hf_sdpa")


@dataclass
class FinetuneBenchConfig:
    model: str = "vit_tiny_patch16"
    img_size: int = 224
    batch_size: int = 8
    num_classes: int = 1000
    dtype: str = "fp32"
    device: str = "cpu"
    warmup: int = 2
    repeats: int = 5
    variants: tuple[str, ...] = VARIANTS
    compile_on_cpu: bool = False

    def __post_init__(self):
        bench.check_config(self, models_vit.MODELS, VARIANTS)


@dataclass
class FinetuneRow:
    variant: str
    status: str = "ok"
    images_per_s: float | None = None
    step_ms_median: float | None = None
    step_ms_min: float | None = None
    step_ms_max: float | None = None
    speedup_vs_hf: float | None = None
    loss: float | None = None
    warnings: list = field(default_factory=list)


def _hf_peer(base: models_vit.VisionTransformer, cfg: FinetuneBenchConfig):
    """HF's ViTForImageClassification with ``base``'s weights, or a RuntimeError saying why not."""
    try:
        import transformers
    except ImportError as err:
        raise RuntimeError(f"transformers is not installed ({err})") from None
    state = export.timm_state_dict(base.state_dict())
    hf_cfg = export.config_from_state(state, num_heads=base.blocks[0].attn.num_heads)
    hf_cfg.pop("model_type", None)
    num_labels = hf_cfg.pop("num_labels")
    config = transformers.ViTConfig(**hf_cfg, num_labels=num_labels, attn_implementation="sdpa")
    peer = transformers.ViTForImageClassification(config)
    tensors, _ = export.hf_state_dict(state)
    peer.load_state_dict(tensors, strict=True)
    return peer, lambda imgs: peer(pixel_values=imgs).logits


def _variant(name: str, base, cfg: FinetuneBenchConfig):
    """``(module, logits_fn)`` for a row, carrying ``base``'s weights."""
    if name == "hf_sdpa":
        return _hf_peer(base, cfg)
    if name == "auto+regional" and cfg.device == "cpu" and not cfg.compile_on_cpu:
        raise RuntimeError("skipped on CPU (compile takes minutes there): --compile-on-cpu")
    model = models_vit.create_model(cfg.model, img_size=cfg.img_size, num_classes=cfg.num_classes,
                                    backend="torch" if name == "torch" else "auto")
    model.load_state_dict(base.state_dict())
    if name == "auto+regional":
        model.compile_blocks()
    return model, model


def run(cfg: FinetuneBenchConfig, progress=None) -> dict:
    """Every row of ``cfg.variants``; returns ``{"config", "env", "rows"}`` (rows as dicts)."""
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    base = models_vit.create_model(cfg.model, img_size=cfg.img_size, num_classes=cfg.num_classes)
    imgs = torch.randn(cfg.batch_size, base.in_chans, cfg.img_size, cfg.img_size, device=device)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)
    rows = []
    for name in cfg.variants:
        if progress:
            progress(name)
        rows.append(_run_row(name, base, cfg, imgs, labels, device))
    hf = next((r for r in rows if r.variant == "hf_sdpa" and r.status == "ok"), None)
    for r in rows:
        if hf is not None and r.status == "ok":
            r.speedup_vs_hf = r.images_per_s / hf.images_per_s
    return {"config": asdict(cfg), "env": bench.environment(device), "rows": [asdict(r) for r in rows]}


def _run_row(name, base, cfg: FinetuneBenchConfig, imgs, labels, device) -> FinetuneRow:
    try:
        module, logits_fn = _variant(name, base, cfg)
    except RuntimeError as err:
        return FinetuneRow(name, status=str(err))
    module.to(device).train()
    opt = bench.make_optimizer(module.parameters())
    dtype = bench.DTYPES[cfg.dtype]
    losses = []

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(logits_fn(imgs), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    times = bench.time_steps(step, device, cfg.warmup, cfg.repeats)
    ms = [1e3 * t for t in times]
    med = statistics.median(ms)
    warn = bench.spread_warning(name, med, min(ms), max(ms))
    return FinetuneRow(name, images_per_s=cfg.batch_size / (med / 1e3), step_ms_median=med, step_ms_min=min(ms),
                       step_ms_max=max(ms), loss=float(losses[0]), warnings=[warn] if warn else [])


def format_table(result: dict) -> str:
    cfg, env = result["config"], result["env"]
    lines = [f"fine-tuning step of {cfg['model']} at {cfg['img_size']} px, batch {cfg['batch_size']}, {cfg['dtype']}, "
             f"on {env.get('gpu') or env['processor']} (forward + cross-entropy + backward + AdamW; cls token, no "
             f"drop path: the same function in every row)",
             f"{'variant':16} {'img/s':>9} {'step ms (min-max)':>24} {'vs HF sdpa':>10}"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['variant']:16} {r['status']}")
            continue
        rng = f"{r['step_ms_median']:.1f} ({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f})"
        vs = "" if r["speedup_vs_hf"] is None else f"{r['speedup_vs_hf']:.2f}x"
        lines.append(f"{r['variant']:16} {r['images_per_s']:9.1f} {rng:>24} {vs:>10}")
        lines += [f"  WARNING {w}" for w in r["warnings"]]
    return "\n".join(lines)
