"""mae-fast: a faster drop-in for the authors' Masked Autoencoder (MAE). Pretrain it with their
recipe and draw its reconstructions, measure where a training step's time goes (throughput beside
the reference and HuggingFace, FLOPs, a per-stage profile), and convert checkpoints."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import bench, flops, models_mae


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_bench(args) -> int:
    device = args.device or _default_device()
    on_gpu = device.startswith("cuda")
    cfg = bench.BenchConfig(
        model=args.model or ("mae_vit_large_patch16" if on_gpu else "mae_vit_tiny_patch16"),
        img_size=args.img_size, batch_size=args.batch_size or (256 if on_gpu else 16),
        mask_ratio=args.mask_ratio, dtype=args.dtype or ("bf16" if on_gpu else "fp32"), device=device,
        warmup=args.warmup if args.warmup is not None else (5 if on_gpu else 3),
        repeats=args.repeats or (20 if on_gpu else 8),
        variants=tuple(args.variants.split(",")) if args.variants else bench.VARIANTS,
        compile_on_cpu=args.compile_on_cpu)
    result = bench.run(cfg, progress=lambda name: print(f"  measuring {name} ...", file=sys.stderr, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    print(bench.format_table(result))
    if args.report:
        _write_report(args, cfg, result)
    return 0


def _write_report(args, cfg, result) -> None:
    from . import profile, report

    print(f"\nsweeps and stage profile for the report in {args.report} ...", file=sys.stderr, flush=True)
    ratios = [float(r) for r in args.mask_ratios.split(",")] if args.mask_ratios else []
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else []
    mask_sweep = bench.sweep_mask_ratio(cfg, ratios) if ratios else None
    batch_sweep = bench.sweep_batch_size(cfg, sizes) if sizes else None
    torch.manual_seed(0)
    model = models_mae.create_model(cfg.model, img_size=cfg.img_size, backend="auto").to(cfg.device)
    imgs = torch.randn(cfg.batch_size, model.in_chans, *model.patch_embed.img_size, device=cfg.device)
    stages = profile.profile(model, imgs, cfg.mask_ratio, warmup=cfg.warmup, repeats=cfg.repeats,
                             dtype=None if cfg.dtype == "fp32" else bench.DTYPES[cfg.dtype])
    print(profile.format_profile(stages, "\nwhere the time goes (backend auto):"))
    paths = report.write_report(args.report, result, stages=stages, mask_sweep=mask_sweep, batch_sweep=batch_sweep)
    print("\nwrote " + ", ".join(paths))


def cmd_flops(args) -> int:
    report = {}
    for name in args.models.split(","):
        if name not in models_mae.MODELS:
            raise SystemExit(f"--models: unknown model {name!r}; choose from {sorted(models_mae.MODELS)}")
        with torch.device("meta"):
            dims = flops.ModelDims.of(models_mae.create_model(name))
        report[name] = {
            variant: flops.summarize(flops.stage_macs(dims, args.mask_ratio, encoder_mask_tokens=emt)).to_dict()
            for variant, emt in (("without_mask_tokens", False), ("with_mask_tokens", True))}
        enc, dec = flops.per_token_macs(dims)
        report[name]["decoder_per_token_fraction"] = dec / enc
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"forward matmul GFLOPs per image at mask ratio {args.mask_ratio} (1 MAC = 2 FLOPs)")
    header = f"{'model':<24}{'variant':<22}{'encoder':>10}{'decoder':>10}{'total':>10}{'GMACs':>9}"
    print(header)
    for name, r in report.items():
        for variant in ("without_mask_tokens", "with_mask_tokens"):
            s = r[variant]
            print(f"{name:<24}{variant:<22}{s['encoder_gflops']:>10.2f}{s['decoder_gflops']:>10.2f}"
                  f"{s['total_gflops']:>10.2f}{s['total_gmacs']:>9.2f}")
        ratio = r["with_mask_tokens"]["total_gflops"] / r["without_mask_tokens"]["total_gflops"]
        print(f"{'':<24}dropping mask tokens: {ratio:.2f}x fewer FLOPs; decoder/encoder per token: "
              f"{100 * r['decoder_per_token_fraction']:.1f}%")
    for name, r in report.items():
        print(f"\n{name}: GFLOPs per stage (GMACs = half); the loss is elementwise, no matmul FLOPs")
        print(f"{'stage':<20}{'without mask tokens':>21}{'with mask tokens':>18}{'ratio':>8}")
        s0, s1 = r["without_mask_tokens"]["stages_gflops"], r["with_mask_tokens"]["stages_gflops"]
        for stage in flops.STAGES:
            print(f"{stage:<20}{s0[stage]:>21.3f}{s1[stage]:>18.3f}{s1[stage] / s0[stage]:>7.2f}x")
    return 0


def cmd_profile(args) -> int:
    from . import profile

    device = torch.device(args.device or _default_device())
    on_gpu = device.type == "cuda"
    name = args.model or ("mae_vit_large_patch16" if on_gpu else "mae_vit_tiny_patch16")
    batch = args.batch_size or (128 if on_gpu else 8)
    dtype = bench.DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    if dtype != torch.float32 and not on_gpu:
        raise ValueError(f"--dtype {args.dtype} (autocast) is for CUDA; use fp32 on {device}")
    torch.manual_seed(0)
    model = models_mae.create_model(name, img_size=args.img_size, backend=args.backend,
                                    encoder_mask_tokens=args.encoder_mask_tokens).to(device)
    imgs = torch.randn(batch, model.in_chans, *model.patch_embed.img_size, device=device)
    rows = profile.profile(model, imgs, args.mask_ratio, warmup=args.warmup, repeats=args.repeats,
                           dtype=None if dtype == torch.float32 else dtype, trace=args.trace)
    if args.json:
        print(json.dumps(profile.rows_to_dicts(rows), indent=2))
        return 0
    title = (f"mae-fast profile: {name}, batch {batch}, mask ratio {args.mask_ratio}, backend {args.backend}"
             f"{', encoder mask tokens' if args.encoder_mask_tokens else ''}, on {device}; median of {args.repeats}")
    print(profile.format_profile(rows, title))
    if args.trace:
        print(f"chrome trace written to {args.trace}")
    return 0


def cmd_convert(args) -> int:
    from . import checkpoint

    skipped = checkpoint.convert_to_safetensors(args.src, args.dst)
    print(f"wrote {args.dst}" + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mae-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="training-step throughput, our backends and peers side by side")
    p.add_argument("--model", choices=sorted(models_mae.MODELS),
                   help="default: mae_vit_large_patch16 on a GPU, mae_vit_tiny_patch16 on a CPU")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, help="default: 256 on a GPU, 16 on a CPU")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--dtype", choices=sorted(bench.DTYPES), help="autocast dtype; default bf16 on a GPU")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(bench.VARIANTS)}")
    p.add_argument("--compile-on-cpu", action="store_true", help="also time torch.compile on a CPU (slow)")
    p.add_argument("--json", metavar="FILE", help="also write the full result as JSON")
    p.add_argument("--report", metavar="DIR", help="also profile stages, run the sweeps, and write "
                   "result.json, report.md and PNG plots into DIR")
    p.add_argument("--mask-ratios", default="0.5,0.75,0.9", help="sweep for --report (empty: none)")
    p.add_argument("--batch-sizes", default="", help="sweep for --report, e.g. 8,16,32 (default: none)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("flops", help="analytic FLOPs: encoder vs decoder, with and without mask tokens")
    p.add_argument("--models", default="mae_vit_base_patch16,mae_vit_large_patch16,mae_vit_huge_patch14")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("profile", help="time per stage (forward and backward) beside the FLOPs per stage")
    p.add_argument("--model", choices=sorted(models_mae.MODELS))
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--dtype", choices=sorted(bench.DTYPES))
    p.add_argument("--device")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"))
    p.add_argument("--encoder-mask-tokens", action="store_true", help="profile the paper's ablation")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--trace", metavar="FILE", help="also export a torch.profiler chrome trace")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)

    from . import pretrain, reconstruct

    p = sub.add_parser("pretrain", help="MAE pretraining, the authors' recipe (torchrun: DDP / --fsdp); --demo")
    pretrain.add_arguments(p)
    p.set_defaults(func=pretrain.main)

    p = sub.add_parser("reconstruct", help="PNG grids: original | masked | reconstruction | + visible")
    reconstruct.add_arguments(p)
    p.set_defaults(func=reconstruct.main)

    p = sub.add_parser("convert", help="convert a checkpoint (official .pth, state dict) to safetensors")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:
        print(f"mae-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
