"""MAE pretraining with the authors' recipe, on one process or on torchrun (DDP or FSDP2).

    python -m mae_fast.pretrain --data-path /data/imagenet/train --model mae_vit_large_patch16 \\
        --norm-pix-loss --epochs 800 --warmup-epochs 40 --blr 1.5e-4 --batch-size 64
    torchrun --nproc-per-node 8 -m mae_fast.pretrain --data-path ... [--fsdp]
    python -m mae_fast.pretrain --demo          # a tiny MAE on generated images, minutes on a CPU

The recipe (the authors' ``main_pretrain.py`` / ``engine_pretrain.py``): AdamW betas (0.9, 0.95),
weight decay 0.05 on matrices only, ``lr = blr * effective batch / 256``, linear warm-up then
half-cycle cosine set every iteration at the fractional epoch, gradient accumulation, autocast
(bf16, or fp16 with a GradScaler), a stop on a non-finite loss, a per-rank seed.

Checkpoints are the authors' layout ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}`` with
``args`` a plain dict (their ``load_model`` reads them; ``torch.load(weights_only=True)`` too),
written by rank 0 only, atomically, as ``checkpoint-<epoch>.pth``; ``--resume`` continues at the
next epoch. Every epoch is seeded from (seed, rank, epoch), so a resumed run draws the same masks
and crops as one that was never interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from . import data as data_mod
from . import models_mae, optim, reconstruct, shards
from .checkpoint import (CheckpointError, atomic_save, check_same_groups, check_same_model, checkpoint_epochs,
                         find_resume_checkpoint, prune_checkpoints, read_checkpoint, training_checkpoint)
from .distributed import (DistInfo, all_reduce_mean, full_model_state, full_optimizer_state, grad_scaler,
                          init_distributed, load_model_state, load_optimizer_state, no_sync, save_rank_state,
                          unwrap, wrap_distributed)

DEMO_MODEL = "mae_vit_demo_patch8"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


# ---------------------------------------------------------------------------- arguments
# Defaults, and the demo's: arguments default to None so that the demo can tell what was given.
DEFAULTS = dict(model="mae_vit_large_patch16", input_size=224, batch_size=64, epochs=400, warmup_epochs=40,
                blr=1.5e-4, norm_pix_loss=False, save_every=20, num_workers=10, output_dir="./output_dir",
                log_every=20)
# 50 epochs with the normalised-pixel target: measured, the probe of `linprobe --demo` reads 80% on
# this encoder against 62% on a random one; 12 epochs without it gave 63.5% (docs/finetuning.md).
DEMO_DEFAULTS = dict(model=DEMO_MODEL, input_size=64, batch_size=64, epochs=50, warmup_epochs=3,
                     blr=4e-3, norm_pix_loss=True, save_every=25, num_workers=0, output_dir="./mae_demo",
                     log_every=10)
DEMO_IMAGES = 2048


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model")
    g.add_argument("--model", choices=sorted(models_mae.MODELS), help=f"default {DEFAULTS['model']} ({DEMO_MODEL} with --demo)")
    g.add_argument("--input-size", type=int, help="image size in pixels (default 224; 64 with --demo)")
    g.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed (default 0.75)")
    g.add_argument("--norm-pix-loss", action="store_true", default=None,
                   help="per-patch normalised pixels as the target (default off; on with --demo)")
    g.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false", help="raw pixels as the target")
    g.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"),
                   help="mae_fast kernel backend (default: MAE_FAST_BACKEND, else auto)")
    g.add_argument("--compile", action="store_true",
                   help="regional torch.compile: each transformer block (model.compile_blocks())")
    g.add_argument("--in-chans", type=int, default=3, choices=(1, 3),
                   help="image channels: 3 (RGB, default) or 1 (grayscale data; images are converted to L)")
    g = parser.add_argument_group("optimisation (the authors' recipe)")
    g.add_argument("--batch-size", type=int, help="images per process per iteration (default 64)")
    g.add_argument("--global-batch-size", type=int,
                   help="alternative to --batch-size: images per optimizer step over all processes; must "
                        "divide by (processes x --accum-iter)")
    g.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation iterations (default 1)")
    g.add_argument("--epochs", type=int, help="default 400 (50 with --demo)")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up epochs (default 40; 3 with --demo)")
    g.add_argument("--lr", type=float, help="absolute lr (default: blr x effective batch / 256)")
    g.add_argument("--blr", type=float, help="base lr per 256 images (default 1.5e-4; 4e-3 with --demo)")
    g.add_argument("--min-lr", type=float, default=0.0, help="lr floor of the cosine (default 0)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="default 0.05 (matrices only)")
    g.add_argument("--decay-tokens", action=argparse.BooleanOptionalAction, default=True,
                   help="decay the cls/mask tokens as the authors' timm add_weight_decay does (default); "
                        "--no-decay-tokens exempts them (mae_fast's old default)")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm (off by default, as the authors)")
    g.add_argument("--amp", choices=("bf16", "fp16", "none"),
                   help="autocast dtype (default bf16 on CUDA, none on CPU; fp16 uses a GradScaler)")
    g.add_argument("--seed", type=int, default=0, help="seed; each rank uses seed + rank (default 0)")
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", help="folder of images, flat or in class sub-folders (e.g. imagenet/train)")
    g.add_argument("--synthetic", type=int, metavar="N", default=0,
                   help="N random images instead of a folder (throughput runs)")
    g.add_argument("--on-bad-image", choices=("skip", "error"), default="skip",
                   help="unreadable image: skip it with a warning (default) or stop with an error")
    g.add_argument("--mean", help="normalisation mean per channel, comma-separated, or 'data' (measured on 500 "
                                  "images of --data-path); default ImageNet's")
    g.add_argument("--std", help="normalisation std per channel, or 'data'; default ImageNet's")
    g.add_argument("--decode", choices=("exact", "draft"), default="exact",
                   help="exact: the authors' pixels (default); draft: JPEGs decoded at a reduced DCT scale "
                        "(1/2-1/8) before the crop, ~2x faster, pixels differ slightly (docs/pretraining.md)")
    g.add_argument("--jpeg-decoder", choices=("auto", "pil", "simplejpeg"), default="auto",
                   help="auto: simplejpeg when installed (the same pixels as PIL, ~2x faster; pip install "
                        "'mae_fast[fast]'), else PIL")
    g.add_argument("--augment", choices=("host", "device"), default="host",
                   help="host: crop, resize and flip in the workers with PIL, the authors' pixels (default); device: "
                        "workers only decode, the batch is cropped/resized/flipped on the GPU (same draws; pixels "
                        "within a level or two of PIL's, docs/pretraining.md)")
    g.add_argument("--num-workers", type=int, help="DataLoader workers per process (default 10; 0 with --demo)")
    g.add_argument("--prefetch-factor", type=int, default=2, help="batches each worker prepares ahead (default 2)")
    g.add_argument("--steps-per-epoch", type=int, help="cap the iterations per epoch (smoke/throughput runs)")
    g = parser.add_argument_group("output and distribution")
    g.add_argument("--output-dir", help="checkpoints and metrics.jsonl (default ./output_dir; ./mae_demo with --demo)")
    g.add_argument("--save-every", type=int, help="checkpoint every N epochs, and at the end (default 20)")
    g.add_argument("--keep-checkpoints", type=int, default=0,
                   help="keep only the newest N checkpoint-*.pth (default 0: keep all)")
    g.add_argument("--resume", help="checkpoint to continue from, or 'auto' for the newest in --output-dir")
    g.add_argument("--log-every", type=int, help="iterations between metrics.jsonl lines (default 20)")
    g.add_argument("--log-dir", help="TensorBoard folder (default: --output-dir), as the authors; written when "
                                     "tensorboard is installed (pip install 'mae_fast[tensorboard]')")
    g.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard events even if installed")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--device", help="default: cuda (the local rank's GPU) if available, else cpu")
    g.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state with FSDP2 (fully_shard per Block)")
    g.add_argument("--demo", action="store_true",
                   help=f"a tiny MAE on {DEMO_IMAGES} generated images (no download): a few minutes on a CPU, "
                        "ends with a reconstruction PNG")
    g.add_argument("--demo-images", type=int, default=DEMO_IMAGES, help=argparse.SUPPRESS)  # tests: fewer images
    g.add_argument("--dump-rank-state", action="store_true", help=argparse.SUPPRESS)  # tests: per-rank weights
    return parser


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    defaults = DEMO_DEFAULTS if args.demo else DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------- seeds
def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    import random

    random.seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one rank's epoch: seed + rank as the authors, plus the epoch, so that a resumed
    run repeats exactly the draws of an uninterrupted one."""
    return seed + rank + 100_003 * epoch


# ---------------------------------------------------------------------------- errors
class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stops (all ranks together)."""


# ---------------------------------------------------------------------------- checks
def _resolve_amp(args, device: torch.device) -> None:
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    if args.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; on a CPU use --amp bf16 or none")


def _batch_sizes(args, info: DistInfo) -> None:
    if args.accum_iter < 1:
        raise ValueError(f"--accum-iter must be >= 1, got {args.accum_iter}")
    if args.global_batch_size is not None:
        per = info.world_size * args.accum_iter
        if args.global_batch_size % per:
            raise ValueError(f"--global-batch-size {args.global_batch_size} does not divide by processes x "
                             f"--accum-iter = {info.world_size} x {args.accum_iter} = {per}")
        args.batch_size = args.global_batch_size // per
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    args.effective_batch_size = args.batch_size * args.accum_iter * info.world_size
    if args.lr is None:
        args.lr = optim.absolute_lr(args.blr, args.effective_batch_size)


# ---------------------------------------------------------------------------- the run
def train(args: argparse.Namespace) -> dict:
    """Run the pretraining described by ``args`` (after :func:`resolve_defaults`); returns a
    summary (first and last losses, epochs, time, paths). Raises on bad input."""
    args = resolve_defaults(args)
    if not 0.0 < args.mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    if args.epochs < 1 or args.save_every < 1:
        raise ValueError("--epochs and --save-every must be >= 1")
    info = init_distributed(args.device)
    try:
        return _train(args, info)
    finally:
        if info.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(args: argparse.Namespace, info: DistInfo) -> dict:
    t_start = time.time()
    _resolve_amp(args, info.device)
    _batch_sizes(args, info)
    if args.fsdp and not info.distributed:
        raise ValueError("--fsdp needs several processes: start with torchrun --nproc-per-node N")
    if info.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
    log = _Log(os.path.join(args.output_dir, "metrics.jsonl"), info.is_main, t_start,
               tensorboard_dir=None if args.no_tensorboard else (args.log_dir or args.output_dir))

    loader, iters = build_loader(args, info)
    model, optimizer, loss_scaler = build_model_and_optimizer(args, info)
    groups = optim.param_group_names(unwrap(model), decay_tokens=args.decay_tokens)
    start_epoch = resume(args, model, optimizer, loss_scaler, groups, log)
    _print_setup(log, args, info, unwrap(model), len(loader.dataset), iters)
    if start_epoch >= args.epochs:
        log.print(f"nothing to do: the checkpoint finished epoch {start_epoch - 1} of {args.epochs}")

    losses, epoch_losses, saved, skipped = [], [], [], 0
    for epoch in range(start_epoch, args.epochs):
        seed_everything(epoch_seed(args.seed, info.rank, epoch))
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        elif info.distributed:
            loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, loader, optimizer, loss_scaler, epoch, iters, args, info, log)
        losses += stats["losses"]
        skipped += stats["skipped"]
        epoch_losses.append(stats["loss"])
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
            path = save_checkpoint(model, optimizer, loss_scaler, epoch, args, info, groups)
            if path:
                saved.append(path)
                log.print(f"saved {path}")
    if args.dump_rank_state:
        save_rank_state(model, args.output_dir, info)
    log.close()
    return dict(first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                epoch_losses=epoch_losses, epochs=args.epochs, start_epoch=start_epoch,
                seconds=time.time() - t_start, checkpoints=saved, output_dir=args.output_dir,
                losses=losses, model=unwrap(model), skipped_images=skipped)


def build_loader(args, info: DistInfo) -> tuple[torch.utils.data.DataLoader, int]:
    """The data set (the same on every rank; the sampler splits it) and its loader; returns the
    loader and the iterations per epoch."""
    seed_everything(args.seed)
    _resolve_mean_std(args)
    dataset = build_dataset(data_path=args.data_path, input_size=args.input_size,
                                     synthetic=args.synthetic, demo=args.demo_images if args.demo else 0,
                                     on_bad_image=args.on_bad_image, seed=args.seed, mean=args.mean,
                                     std=args.std, channels=args.in_chans, output="uint8",
                                     draft=args.decode == "draft", count_skipped=True,
                                     augment="device" if args.augment == "device" and not args.synthetic else "host",
                                     decoder=args.jpeg_decoder)
    if isinstance(dataset, torch.utils.data.IterableDataset):  # tar shards: split by rank and worker
        dataset.set_distributed(info.rank, info.world_size)
        dataset.batch_size = args.batch_size
        sampler, per_rank = None, len(dataset)
    elif info.distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                                      shuffle=True, seed=args.seed)
        per_rank = len(sampler)
    else:
        sampler = torch.utils.data.RandomSampler(dataset)
        per_rank = len(dataset)
    if per_rank < args.batch_size:
        raise ValueError(f"the data set has {len(dataset)} images, {per_rank} per process: fewer than one batch of "
                         f"--batch-size {args.batch_size} (the last partial batch is dropped, as the authors do)")
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=info.device.type == "cuda", drop_last=True,
        prefetch_factor=args.prefetch_factor if args.num_workers > 0 else None,
        collate_fn=data_mod.collate_device if isinstance(getattr(dataset, "transform", None), data_mod.DeviceAugmentTransform) else None,
        # not persistent: workers are re-created (and re-seeded) each epoch from the epoch's seed,
        # so a resumed run draws the same crops as one never interrupted
        persistent_workers=False)
    iters = len(loader) if not args.steps_per_epoch else min(len(loader), args.steps_per_epoch)
    if iters < args.accum_iter:
        raise ValueError(f"{iters} iterations per epoch are fewer than --accum-iter {args.accum_iter}")
    return loader, iters


def _resolve_mean_std(args) -> None:
    """``--mean``/``--std`` -> tuples in ``args`` (ImageNet's, given values, or measured on the data)."""
    if isinstance(args.mean, tuple) and isinstance(args.std, tuple):
        return  # resolved already
    mean = data_mod.parse_mean_std(args.mean, args.in_chans, "mean")
    std = data_mod.parse_mean_std(args.std, args.in_chans, "std")
    if "data" in (args.mean, args.std):
        if not args.data_path or args.synthetic or args.demo:
            raise ValueError("--mean/--std data needs --data-path (an image folder)")
        measured = data_mod.measure_mean_std(args.data_path, args.in_chans, seed=args.seed)
        mean, std = mean or measured[0], std or measured[1]
    default = data_mod.default_mean_std(args.in_chans)
    args.mean, args.std = tuple(mean or default[0]), tuple(std or default[1])


def build_dataset(*, data_path: str | None, input_size: int, synthetic: int = 0, demo: int = 0,
                  on_bad_image: str = "skip", seed: int = 0, mean=data_mod.IMAGENET_DEFAULT_MEAN,
                  std=data_mod.IMAGENET_DEFAULT_STD, channels: int = 3, output: str = "float", draft: bool = False,
                  count_skipped: bool = False, augment: str = "host", decoder: str = "auto") -> torch.utils.data.Dataset:
    """The training set: the demo shapes, synthetic images, webdataset-style tar shards
    (:mod:`mae_fast.shards`: a folder holding ``shards.json``, or a ``.tar``/pattern), or an image
    folder. See :class:`mae_fast.data.PretrainTransform` for ``output`` and ``draft``."""
    kind = data_mod.DeviceAugmentTransform if augment == "device" else data_mod.PretrainTransform
    transform = kind(input_size, mean=mean, std=std, channels=channels, output=output, draft=draft)
    if demo:
        return data_mod.DemoShapes(demo, size=max(96, input_size + input_size // 2), seed=seed, transform=transform)
    if synthetic:
        return data_mod.SyntheticImages(synthetic, input_size, in_chans=channels, seed=seed)
    if not data_path:
        raise ValueError("give --data-path FOLDER (images, flat or in class sub-folders), or --synthetic N, or --demo")
    if shards.is_shards(data_path):
        return shards.TarShards(data_path, transform, on_bad_image=on_bad_image, seed=seed,
                                count_skipped=count_skipped, decoder=decoder)
    return data_mod.ImageFolder(data_path, transform, on_bad_image=on_bad_image, lazy=draft, count_skipped=count_skipped,
                                 decoder=decoder)


def build_model_and_optimizer(args, info: DistInfo):
    """The model, wrapped for DDP / FSDP2, AdamW with the authors' groups and the loss scaler.
    Returns ``(model, optimizer, loss_scaler)``; ``distributed.unwrap(model)`` is the bare model."""
    seed_everything(args.seed)  # without the rank: the same initial weights on every rank
    model = models_mae.create_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                                    backend=args.backend, in_chans=args.in_chans)
    if args.compile:
        model.compile_blocks()  # regional: each Block compiled in place (before DDP/FSDP wrap it)
    # the optimizer takes the parameters FSDP2 has sharded, so it comes after the wrapping
    model = wrap_distributed(model.to(info.device), info, fsdp=args.fsdp)
    groups = optim.param_groups(unwrap(model), args.weight_decay, decay_tokens=args.decay_tokens)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    loss_scaler = optim.LossScaler(grad_scaler(model) if args.amp == "fp16" else None)
    return model, optimizer, loss_scaler


def resume(args, model, optimizer, loss_scaler: optim.LossScaler, groups, log: _Log) -> int:
    """Load ``--resume`` (a file, or ``auto``: the newest checkpoint in ``--output-dir``) into the
    model, the optimizer and the scaler; returns the epoch to start at."""
    ckpt, start_epoch = resume_model(args, model, log)
    if start_epoch > 0:
        check_same_groups(ckpt, groups, args.decay_tokens)
        load_optimizer_state(model, optimizer, ckpt["optimizer"], groups)
        loss_scaler.load_state_dict(ckpt.get("scaler"))
    return start_epoch


def resume_model(args, model, log: _Log) -> tuple[dict | None, int]:
    """The model's part of :func:`resume` (fine-tuning shares it): ``(checkpoint or None, the
    epoch to start at)``, the weights loaded."""
    path = args.resume
    if path == "auto":
        path = find_resume_checkpoint(args.output_dir, say=log.print)
        if path is None:
            log.print(f"--resume auto: no intact checkpoint in {args.output_dir}, starting afresh")
    if not path:
        return None, 0
    ckpt = read_checkpoint(path)
    check_same_model(ckpt, unwrap(model), args, path)
    load_model_state(model, {k.removeprefix("module."): v for k, v in ckpt["model"].items()})
    # a file with weights alone (e.g. the authors' mae_visualize_*) starts a fresh run from them
    start_epoch = int(ckpt["epoch"]) + 1 if "epoch" in ckpt and "optimizer" in ckpt else 0
    log.print(f"resumed from {path}: next epoch {start_epoch}")
    return ckpt, start_epoch


def train_one_epoch(model, loader, optimizer, loss_scaler: optim.LossScaler, epoch: int, iters: int,
                    args, info: DistInfo, log: _Log) -> dict:
    """One epoch (the authors' ``engine_pretrain.train_one_epoch``): the lr set at each step's
    fractional epoch, a step every ``--accum-iter`` iterations. Returns the epoch's losses."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    amp = AMP_DTYPES[args.amp]
    autocast = torch.autocast(info.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    sched = dict(lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, epochs=args.epochs)
    steps = iters // args.accum_iter
    bar = _progress(iters, f"epoch {epoch}/{args.epochs}", info.is_main and not args.no_progress)
    t0, losses, lr, skipped = time.time(), [], args.lr, 0
    for it, batch in enumerate(loader):
        samples = batch[0]
        if len(batch) > 2:
            skipped += int(batch[2].sum())
        if it >= steps * args.accum_iter:
            break  # the iterations that cannot fill an accumulation (the authors compute and drop them)
        if it % args.accum_iter == 0:
            lr = optim.adjust_learning_rate(optimizer, it / iters + epoch, **sched)
        update = (it + 1) % args.accum_iter == 0
        with no_sync(model, info, update):
            with autocast:
                # uint8 from the loader: normalised here, on the device (bit-identical to the host path)
                x = data_mod.prepare_batch(samples, info.device, args.input_size, args.mean, args.std)
                loss, _, _ = model(x, mask_ratio=args.mask_ratio)
            loss_value = all_reduce_mean(loss.item(), info)  # every rank sees the same value: all stop together
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"the loss is {loss_value} at epoch {epoch}, iteration {it}: stopping (the last checkpoint "
                    f"is intact). Try a lower --blr, --amp bf16 instead of fp16, or --clip-grad")
            loss_scaler(loss / args.accum_iter, optimizer, clip_grad=args.clip_grad, parameters=model.parameters(),
                        update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss_value)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if (it + 1) % args.log_every == 0:
            log.write(kind="iter", epoch=epoch, iter=it + 1, step=epoch * steps + (it + 1) // args.accum_iter,
                      loss=loss_value, lr=lr)
        if update:  # the authors' TensorBoard scalars, at their x axis (1000 x the fractional epoch)
            log.scalars(int((it / iters + epoch) * 1000), train_loss=loss_value, lr=lr)
    if bar is not None:
        bar.close()
    seconds, mean = time.time() - t0, sum(losses) / max(len(losses), 1)
    imgs_per_s = len(losses) * args.batch_size * info.world_size / seconds
    skipped = int(all_reduce_mean(float(skipped), info) * info.world_size + 0.5)
    log.write(kind="epoch", epoch=epoch, train_loss=mean, train_lr=lr, step=(epoch + 1) * steps,
              imgs_per_s=imgs_per_s, epoch_time=seconds, skipped_images=skipped)
    log.print(f"epoch {epoch}: loss {mean:.4f}  lr {lr:.3g}  {seconds:.1f}s  {imgs_per_s:.0f} img/s"
              + (f"  (unreadable images skipped {skipped} times)" if skipped else ""))
    return dict(losses=losses, loss=mean, lr=lr, seconds=seconds, skipped=skipped)


def save_checkpoint(model, optimizer, loss_scaler: optim.LossScaler, epoch: int, args, info: DistInfo,
                    groups) -> str | None:
    """Rank 0 writes ``checkpoint-<epoch>.pth`` (the authors' layout) atomically; returns its path
    (None on other ranks). Under FSDP every rank takes part in gathering the full state."""
    state = full_model_state(model)
    osd = full_optimizer_state(model, optimizer, groups, info)
    path = None
    if info.is_main:
        path = os.path.join(args.output_dir, f"checkpoint-{epoch}.pth")
        atomic_save(training_checkpoint(state, osd, epoch, loss_scaler.state_dict(), args,
                                        world_size=info.world_size), path)
        prune_checkpoints(args.output_dir, args.keep_checkpoints)
    if info.distributed:
        dist.barrier()  # every rank goes on (or ends) with the checkpoint complete on disk
    return path


# ---------------------------------------------------------------------------- logging
class _Log:
    """Rank 0's JSON-lines metrics log (each record stamped with the seconds since ``t0``) and printing."""

    def __init__(self, path: str | None, enabled: bool, t0: float, tensorboard_dir: str | None = None):
        self.enabled, self.t0 = enabled, t0
        self.f = open(path, "a") if (enabled and path) else None
        self.tb = None
        if enabled and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional extra: pip install 'mae_fast[tensorboard]'
                SummaryWriter = None
            if SummaryWriter is not None:
                os.makedirs(tensorboard_dir, exist_ok=True)
                self.tb = SummaryWriter(log_dir=tensorboard_dir)

    def scalars(self, step: int, **values) -> None:
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def write(self, **record) -> None:
        if self.f:
            self.f.write(json.dumps({**record, "time": round(time.time() - self.t0, 3)}) + "\n")
            self.f.flush()

    def print(self, *a) -> None:
        if self.enabled:
            print(*a, flush=True)

    def close(self) -> None:
        if self.f:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)


def _print_setup(log: _Log, args, info: DistInfo, module, n_images: int, iters: int) -> None:
    n_params = sum(p.numel() for p in module.parameters())
    log.print(f"model {args.model} ({n_params / 1e6:.2f}M parameters) at {args.input_size}px on {info.device}"
              f"{' x ' + str(info.world_size) + (' (FSDP2)' if args.fsdp else ' (DDP)') if info.distributed else ''}; "
              f"{n_images} images, {iters} iterations/epoch; batch {args.batch_size}/process x accum "
              f"{args.accum_iter} x {info.world_size} = {args.effective_batch_size}; lr {args.lr:.3g} "
              f"(blr {args.blr:.3g}); amp {args.amp}; mask ratio {args.mask_ratio}, "
              f"{'normalised' if args.norm_pix_loss else 'raw'} pixel target")


# ---------------------------------------------------------------------------- the demo's ending
def demo_reconstruction(checkpoint: str, args, n: int = 4) -> tuple[str, str]:
    """Reconstruct ``n`` held-out generated images (a seed the training set never used) with the
    last checkpoint; writes their PNGs and one grid PNG into the output folder. Returns
    (grid path, images folder)."""
    folder = os.path.join(args.output_dir, "demo_images")
    paths = data_mod.save_demo_images(folder, n, size=args.input_size)
    model, _ = reconstruct.model_from_checkpoint(checkpoint)
    imgs = torch.stack([data_mod.load_image(p, args.input_size) for p in paths])
    out = os.path.join(args.output_dir, "demo_reconstruction.png")
    reconstruct.save_grid(model, imgs, out, mask_ratio=args.mask_ratio, seed=args.seed, scale=3)
    return out, folder


# ---------------------------------------------------------------------------- entry points
def main(args: argparse.Namespace) -> int:
    try:
        summary = train(args)
    except NonFiniteLossError as err:
        print(f"mae-fast pretrain: stopped: {err}", file=sys.stderr)
        return 1
    except CheckpointError as err:
        print(f"mae-fast pretrain: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"mae-fast pretrain: error: {err}", file=sys.stderr)
        return 2
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0 and summary["losses"]:
        k = max(1, min(20, len(summary["losses"]) // 4))
        first = sum(summary["losses"][:k]) / k
        last = sum(summary["losses"][-k:]) / k
        print(f"done in {summary['seconds']:.0f}s: loss {first:.4f} (mean of the first {k} iterations) -> "
              f"{last:.4f} (last {k}); checkpoints in {summary['output_dir']}")
        if summary["skipped_images"]:
            print(f"skipped an unreadable image {summary['skipped_images']} times in all (each file named once in a "
                  f"warning; --on-bad-image error stops at the first)")
    if args.demo and rank0:
        found = checkpoint_epochs(summary["output_dir"])
        if found:
            out, folder = demo_reconstruction(found[-1][1], args)
            print(f"wrote {out} (rows: images; columns: original | masked | reconstruction | "
                  f"reconstruction + visible patches)\ntry: mae-fast reconstruct --checkpoint {found[-1][1]} "
                  f"{folder}/demo_000.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="python -m mae_fast.pretrain", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter))


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
