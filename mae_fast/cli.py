"""mae-fast: a faster drop-in for the authors' Masked Autoencoder (MAE). Pretrain it with their
recipe and draw its reconstructions, measure where a training step's time goes (throughput beside
the reference and HuggingFace, FLOPs, a per-stage profile), and convert checkpoints."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import bench, flops, models_mae, profile


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_bench(args) -> int:
    if args.data or args.synthetic_jpeg:  # the input pipeline, beside the model's step rate
        from . import loader_bench

        return loader_bench.main(loader_bench.from_bench_args(args))
    device = args.device or _default_device()
    on_gpu = device.startswith("cuda")
    if args.task == "finetune":
        return _bench_finetune(args, device, on_gpu)
    cfg = bench.BenchConfig(
        model=args.model or ("mae_vit_large_patch16" if on_gpu else "mae_vit_tiny_patch16"),
        img_size=args.img_size, batch_size=args.batch_size or (256 if on_gpu else 16),
        mask_ratio=args.mask_ratio, dtype=args.dtype or ("bf16" if on_gpu else "fp32"), device=device,
        warmup=args.warmup if args.warmup is not None else (5 if on_gpu else 3),
        repeats=args.repeats or (20 if on_gpu else 8),
        variants=tuple(v for v in args.variants.split(",") if v) if args.variants is not None else bench.VARIANTS,
        compile_on_cpu=args.compile_on_cpu, compile_backend=args.compile_backend)
    sweeps = {"depths": _ints(args.decoder_depths, "--decoder-depths"),  # checked before anything runs
              "widths": _ints(args.decoder_widths, "--decoder-widths")}
    progress = lambda name: print(f"  measuring {name} ...", file=sys.stderr, flush=True)  # noqa: E731
    result = bench.run(cfg, progress=progress)
    print(bench.format_table(result))
    ablation = _decoder_ablation(cfg, progress, **sweeps) if args.ablate_decoder else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result.to_dict(), **({"decoder_ablation": ablation} if ablation else {})}, f, indent=2)
    if args.report:
        _write_report(args, cfg, result, ablation)
    return 0


def _bench_finetune(args, device: str, on_gpu: bool) -> int:
    from . import bench_finetune as bf

    cfg = bf.FinetuneBenchConfig(
        model=args.model or ("vit_large_patch16" if on_gpu else "vit_tiny_patch16"), img_size=args.img_size,
        batch_size=args.batch_size or (256 if on_gpu else 8), dtype=args.dtype or ("bf16" if on_gpu else "fp32"),
        device=device, warmup=args.warmup if args.warmup is not None else (5 if on_gpu else 2),
        repeats=args.repeats or (20 if on_gpu else 5), compile_on_cpu=args.compile_on_cpu,
        variants=tuple(v for v in args.variants.split(",") if v) if args.variants is not None else bf.VARIANTS)
    result = bf.run(cfg, progress=lambda name: print(f"  measuring {name} ...", file=sys.stderr, flush=True))
    print(bf.format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}") from None


def _decoder_ablation(cfg, progress, depths, widths) -> dict:
    point = bench._sweep_point(cfg)  # a sweep's points: fewer timed steps than the table's rows
    ablation = profile.decoder_ablation(
        cfg.model, img_size=cfg.img_size, batch_size=cfg.batch_size, mask_ratio=cfg.mask_ratio, device=cfg.device,
        dtype=None if cfg.dtype == "fp32" else bench.DTYPES[cfg.dtype], warmup=point["warmup"],
        repeats=point["repeats"], depths=depths, widths=widths, progress=progress)
    print("\n" + profile.format_ablation(ablation))
    return ablation


def _write_report(args, cfg, result, ablation=None) -> None:
    from . import report

    print(f"\nsweeps and stage profile for the report in {args.report} ...", file=sys.stderr, flush=True)
    ratios = [float(r) for r in args.mask_ratios.split(",")] if args.mask_ratios else []
    sizes = _ints(args.batch_sizes, "--batch-sizes") if args.batch_sizes else []
    mask_sweep = bench.sweep_mask_ratio(cfg, ratios) if ratios else None
    batch_sweep = bench.sweep_batch_size(cfg, sizes) if sizes else None
    for warning in bench.sweep_warnings(mask_sweep, batch_sweep):
        print(f"WARNING {warning}")
    torch.manual_seed(0)
    model = models_mae.create_model(cfg.model, img_size=cfg.img_size, backend="auto").to(cfg.device)
    imgs = torch.randn(cfg.batch_size, model.in_chans, *model.patch_embed.img_size, device=cfg.device)
    dtype = None if cfg.dtype == "fp32" else bench.DTYPES[cfg.dtype]
    stages = profile.profile(model, imgs, cfg.mask_ratio, warmup=cfg.warmup, repeats=cfg.repeats, dtype=dtype)
    print(profile.format_profile(stages, "\nwhere the time goes (backend auto):"))
    kernels = None
    if imgs.is_cuda:
        kernels = profile.kernel_profile(model, imgs, cfg.mask_ratio, warmup=min(cfg.warmup, 2), dtype=dtype)
        print("\n" + profile.format_kernel_profile(kernels, "where the GPU time goes, per kernel kind (backend auto):"))
    paths = report.write_report(args.report, result, stages=stages, mask_sweep=mask_sweep, batch_sweep=batch_sweep,
                                kernels=kernels, ablation=ablation)
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
    device = torch.device(args.device or _default_device())
    on_gpu = device.type == "cuda"
    name = args.model or ("mae_vit_large_patch16" if on_gpu else "mae_vit_tiny_patch16")
    batch = args.batch_size or (128 if on_gpu else 8)
    dtype = bench.DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    if dtype != torch.float32 and not on_gpu:
        raise ValueError(f"--dtype {args.dtype} (autocast) is for CUDA; use fp32 on {device}")
    if args.kernels and not on_gpu:
        raise ValueError(f"--kernels needs CUDA: it groups the GPU time of the step's kernels (torch.profiler's "
                         f"CUDA activity), and this run is on {device}; without --kernels the stage profile runs here")
    torch.manual_seed(0)
    model = models_mae.create_model(name, img_size=args.img_size, backend=args.backend,
                                    encoder_mask_tokens=args.encoder_mask_tokens).to(device)
    imgs = torch.randn(batch, model.in_chans, *model.patch_embed.img_size, device=device)
    autocast_dtype = None if dtype == torch.float32 else dtype
    title = (f"mae-fast profile{' --kernels' if args.kernels else ''}: {name}, batch {batch}, mask ratio "
             f"{args.mask_ratio}, {args.dtype or ('bf16' if on_gpu else 'fp32')}, backend {args.backend}"
             f"{', encoder mask tokens' if args.encoder_mask_tokens else ''}, on {device}")
    if args.kernels:
        result = profile.kernel_profile(model, imgs, args.mask_ratio, warmup=args.warmup, dtype=autocast_dtype)
        data, text = result, profile.format_kernel_profile(result, f"{title}; one step after {args.warmup} warm-up")
    else:
        rows = profile.profile(model, imgs, args.mask_ratio, warmup=args.warmup, repeats=args.repeats,
                               dtype=autocast_dtype, trace=args.trace)
        data, text = profile.rows_to_dicts(rows), profile.format_profile(rows, f"{title}; median of {args.repeats}")
    if args.json == "-":
        print(json.dumps(data, indent=2))
        return 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": name, "rows": data} if isinstance(data, list) else {"model": name, **data}, f, indent=2)
    print(text)
    if args.trace and not args.kernels:
        print(f"chrome trace written to {args.trace}")
    return 0


def cmd_convert(args) -> int:
    from . import checkpoint

    skipped = checkpoint.convert_to_safetensors(args.src, args.dst)
    print(f"wrote {args.dst}" + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    return 0


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from . import models_vit

    p.add_argument("--task", choices=("pretrain", "finetune"), default="pretrain",
                   help="the MAE pretraining step (default), or the fine-tuning step of models_vit beside HF's "
                   "ViTForImageClassification sdpa, same weights (rows: torch, auto, auto+regional, hf_sdpa)")
    p.add_argument("--model", choices=sorted(models_mae.MODELS) + sorted(models_vit.MODELS),
                   help="default: mae_vit_large_patch16 on a GPU, mae_vit_tiny_patch16 on a CPU (with --task "
                   "finetune: vit_large_patch16, vit_tiny_patch16)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, help="default: 256 on a GPU, 16 on a CPU")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--dtype", choices=sorted(bench.DTYPES), help="autocast dtype; default bf16 on a GPU")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(bench.VARIANTS)} "
                   "(default: all; auto+regional = compile_blocks, auto+graphs = whole step in a CUDA graph)")
    p.add_argument("--compile-on-cpu", action="store_true", help="also time the compiled rows on a CPU (slow)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compiled rows (default inductor; eager traces only)")
    p.add_argument("--json", metavar="FILE", help="also write the full result as JSON")
    p.add_argument("--report", metavar="DIR", help="also profile stages (and, on CUDA, kernels), run the sweeps, "
                   "and write result.json, report.md and PNG plots into DIR")
    p.add_argument("--mask-ratios", default="0.5,0.75,0.9", help="sweep for --report (empty: none)")
    p.add_argument("--batch-sizes", default="", help="sweep for --report, e.g. 8,16,32 (default: none)")
    p.add_argument("--ablate-decoder", action="store_true",
                   help="also run the paper's decoder depth and width sweeps (step time, decoder share of time "
                   "beside its share of FLOPs), at --batch-size; into --json and --report")
    p.add_argument("--decoder-depths", default=",".join(map(str, profile.DECODER_DEPTHS)),
                   help="depth sweep of --ablate-decoder, at the model's decoder width")
    p.add_argument("--decoder-widths", default=",".join(map(str, profile.DECODER_WIDTHS)),
                   help="width sweep of --ablate-decoder, at the model's decoder depth (multiples of its heads)")
    from . import loader_bench

    loader_bench.add_arguments(p, within_bench=True)  # --data / --synthetic-jpeg: the loader, per stage
    return p.set_defaults(func=cmd_bench)


def _profile_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--kernels", action="store_true", help="CUDA only: the GPU time of one step's kernels by kind "
                   "(GEMM, attention, norm, elementwise, optimizer, copy/other) for the encoder and the decoder, "
                   "each beside its floor")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="print the result as JSON instead of the table; with FILE, write it there and print the table")
    return p.set_defaults(func=cmd_profile)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mae-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    _bench_arguments(sub.add_parser("bench", help="training-step throughput, our backends and peers side by side"))

    p = sub.add_parser("flops", help="analytic FLOPs: encoder vs decoder, with and without mask tokens")
    p.add_argument("--models", default="mae_vit_base_patch16,mae_vit_large_patch16,mae_vit_huge_patch14")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flops)

    _profile_arguments(sub.add_parser("profile", help="time per stage (forward and backward) beside the FLOPs "
                                                       "per stage"))

    from . import export, finetune, pretrain, reconstruct, shards

    p = sub.add_parser("pretrain", help="MAE pretraining, the authors' recipe (torchrun: DDP / --fsdp); --demo")
    pretrain.add_arguments(p)
    p.set_defaults(func=pretrain.main)

    p = sub.add_parser("reconstruct", help="PNG grids: original | masked | reconstruction | + visible")
    reconstruct.add_arguments(p)
    p.set_defaults(func=reconstruct.main)

    p = sub.add_parser("shards", help="write an image folder as webdataset-style tar shards (for --data-path)")
    shards.add_arguments(p)
    p.set_defaults(func=shards.main)

    for mode, text in (("finetune", "fine-tune models_vit from an MAE checkpoint, the authors' recipe; --demo"),
                       ("linprobe", "linear probe (LARS, BatchNorm head) of a frozen MAE encoder; --demo")):
        p = sub.add_parser(mode, help=text)
        finetune.add_arguments(p, mode)
        p.set_defaults(func=finetune.main)

    p = sub.add_parser("export", help="the encoder as timm VisionTransformer weights and/or a HF ViT folder")
    export.add_arguments(p)
    p.set_defaults(func=export.main)

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
