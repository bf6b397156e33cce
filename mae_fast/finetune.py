"""Fine-tuning and linear probing with the authors' recipes (their ``main_finetune.py`` /
``main_linprobe.py`` / ``engine_finetune.py``), on pretraining's machinery: one process or
torchrun (DDP, ``--fsdp`` for FSDP2), autocast, checkpoints in the authors' layout, ``--resume``.

    python -m mae_fast.finetune finetune --data-path /data/imagenet --model vit_base_patch16 \\
        --pretrained mae_pretrain_vit_base.pth --batch-size 32 --accum-iter 4
    python -m mae_fast.finetune linprobe --data-path /data/imagenet --pretrained ... --batch-size 512
    python -m mae_fast.finetune linprobe --demo     # after pretrain --demo: pretrained vs random encoder

``--data-path`` holds ``train/`` and ``val/``, each with one sub-folder per class (ImageNet's
layout). Fine-tuning: AdamW (0.9, 0.999), weight decay 0.05, layer-wise lr decay, drop path, label
smoothing 0.1, mixup 0.8 / cutmix 1.0 (``mae_fast.mixup``), warm-up + half-cycle cosine, global
pooling, the head's weight drawn with std 2e-5 after loading; RandAugment and random erasing when
timm and torchvision import (the run says what it skipped when they do not). ``--trainable-blocks
N``: the paper's partial fine-tuning (the last N blocks, the final norm and the head train, the
rest is frozen). Linear probe: LARS, weight decay 0, a non-affine BatchNorm before the head (head
std 0.01), everything but the head frozen, the cls token's features. Both evaluate top-1 / top-5
on ``val/`` (resize to ``input_size / 0.875``, centre crop) after every epoch.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from . import data as data_mod
from . import models_vit, optim, pretrain
from .checkpoint import checkpoint_epochs
from .demo_classes import DemoClasses
from .distributed import (DistInfo, all_reduce_mean, grad_scaler, init_distributed, load_optimizer_state,
                          no_sync, save_rank_state, sync_buffers, unwrap, wrap_distributed)
from .finetune_optim import LARS, param_group_names_lrd
from .mixup import Mixup, soft_target_cross_entropy
from .pretrain import AMP_DTYPES, NonFiniteLossError, _batch_sizes, _Log, _progress, _resolve_amp, epoch_seed, \
    seed_everything

MODES = ("finetune", "linprobe")
DEMO_MODEL = "vit_demo_patch8"
DEMO_PRETRAIN_DIR = "./mae_demo"  # where `mae-fast pretrain --demo` writes
# The authors' per-model fine-tuning recipe (their FINETUNE.md), then the defaults of each mode.
FINETUNE_RECIPES = {
    "vit_base_patch16": dict(epochs=100, blr=5e-4, layer_decay=0.65, drop_path=0.1),
    "vit_large_patch16": dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2),
    "vit_huge_patch14": dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.3),
}
DEFAULTS = {
    "finetune": dict(model="vit_large_patch16", input_size=224, batch_size=64, epochs=50, warmup_epochs=5,
                     blr=1e-3, weight_decay=0.05, layer_decay=0.75, drop_path=0.1, smoothing=0.1, mixup=0.8,
                     cutmix=1.0, aa="rand-m9-mstd0.5-inc1", reprob=0.25, global_pool=True, min_crop_scale=0.08,
                     save_every=20, num_workers=10, output_dir="./output_dir", log_every=20),
    "linprobe": dict(model="vit_large_patch16", input_size=224, batch_size=512, epochs=90, warmup_epochs=10,
                     blr=0.1, weight_decay=0.0, layer_decay=1.0, drop_path=0.0, smoothing=0.0, mixup=0.0,
                     cutmix=0.0, aa="none", reprob=0.0, global_pool=False, min_crop_scale=0.08,
                     save_every=20, num_workers=10, output_dir="./output_dir", log_every=20),
}
# The demo: the tiny encoder of `pretrain --demo` on labelled generated images (mae_fast.demo_classes).
DEMO_DEFAULTS = {
    "finetune": dict(model=DEMO_MODEL, input_size=64, batch_size=64, epochs=8, warmup_epochs=1, blr=2e-3,
                     layer_decay=0.75, drop_path=0.1, mixup=0.0, cutmix=0.0, aa="none", reprob=0.0,
                     min_crop_scale=0.5, save_every=8, num_workers=0, output_dir="./mae_demo_finetune",
                     log_every=10),
    # LARS moves each weight by about lr x 0.001 of its norm per step: the paper's lr (0.1 x 16384 / 256
    # = 6.4) over thousands of steps; the demo's 640 steps at batch 64 need blr 16 (lr 4) to converge.
    "linprobe": dict(model=DEMO_MODEL, input_size=64, batch_size=64, epochs=20, warmup_epochs=1, blr=16.0,
                     min_crop_scale=1.0, save_every=20, num_workers=0, output_dir="./mae_demo_linprobe",
                     log_every=10),
}
DEMO_TRAIN, DEMO_VAL = 2048, 768


def add_arguments(parser: argparse.ArgumentParser, mode: str = "finetune") -> argparse.ArgumentParser:
    """The options of ``mae-fast finetune`` (``mode="finetune"``) or ``mae-fast linprobe``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    d = DEFAULTS[mode]
    parser.set_defaults(mode=mode)
    g = parser.add_argument_group("model")
    g.add_argument("--model", choices=sorted(models_vit.MODELS),
                   help=f"default {d['model']} ({DEMO_MODEL} with --demo)")
    g.add_argument("--input-size", type=int, help="image size in pixels (default 224; 64 with --demo)")
    g.add_argument("--pretrained", "--finetune", dest="pretrained", metavar="CKPT",
                   help="MAE checkpoint to start from (the authors' --finetune); 'none' or absent: random "
                        f"init. With --demo: the newest checkpoint of {DEMO_PRETRAIN_DIR}")
    g.add_argument("--nb-classes", type=int, help="classes (default: the class folders of train/)")
    g.add_argument("--global-pool", dest="global_pool", action="store_true", default=None,
                   help=f"average the patch tokens (default {'on' if d['global_pool'] else 'off'})")
    g.add_argument("--cls-token", dest="global_pool", action="store_false", help="use the cls token's features")
    g.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"),
                   help="mae_fast kernel backend (default: MAE_FAST_BACKEND, else auto)")
    g.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks (compile_blocks)")
    if mode == "finetune":
        g.add_argument("--drop-path", type=float, help="stochastic depth rate (default: the model's recipe, 0.1 B / "
                       "0.2 L / 0.3 H)")
        g.add_argument("--trainable-blocks", type=int, metavar="N",
                       help="partial fine-tuning: train only the last N blocks, the final norm and the head")
    g = parser.add_argument_group("optimisation (the authors' recipe)")
    g.add_argument("--batch-size", type=int, help=f"images per process per iteration (default {d['batch_size']})")
    g.add_argument("--global-batch-size", type=int, help="images per optimizer step over all processes")
    g.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation iterations (default 1)")
    g.add_argument("--epochs", type=int, help=f"default {d['epochs']}")
    g.add_argument("--warmup-epochs", type=float, help=f"linear warm-up epochs (default {d['warmup_epochs']})")
    g.add_argument("--lr", type=float, help="absolute lr (default: blr x effective batch / 256)")
    g.add_argument("--blr", type=float, help=f"base lr per 256 images (default {d['blr']})")
    g.add_argument("--min-lr", type=float, default=1e-6 if mode == "finetune" else 0.0,
                   help="lr floor of the cosine")
    g.add_argument("--weight-decay", type=float, help=f"default {d['weight_decay']}")
    if mode == "finetune":
        g.add_argument("--layer-decay", type=float, help="layer-wise lr decay (default: 0.65 B, 0.75 L/H)")
        g.add_argument("--smoothing", type=float, help="label smoothing (default 0.1)")
        g.add_argument("--mixup", type=float, help="mixup alpha (default 0.8; 0 off)")
        g.add_argument("--cutmix", type=float, help="cutmix alpha (default 1.0; 0 off)")
        g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch (default 1)")
        g.add_argument("--mixup-switch-prob", type=float, default=0.5,
                       help="probability of cutmix when both are on (default 0.5)")
        g.add_argument("--aa", help="timm RandAugment policy (default rand-m9-mstd0.5-inc1; 'none' off); needs timm")
        g.add_argument("--reprob", type=float, help="random erasing probability (default 0.25); needs timm")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm (off by default)")
    g.add_argument("--amp", choices=("bf16", "fp16", "none"), help="autocast dtype (default bf16 on CUDA, none on CPU)")
    g.add_argument("--seed", type=int, default=0, help="seed; each rank uses seed + rank (default 0)")
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", help="folder with train/ and val/, one sub-folder per class")
    g.add_argument("--synthetic", type=int, metavar="N", default=0,
                   help="N random images with random labels instead of a folder (throughput runs)")
    g.add_argument("--min-crop-scale", type=float, help="RandomResizedCrop's smallest area (default 0.08)")
    g.add_argument("--on-bad-image", choices=("skip", "error"), default="skip")
    g.add_argument("--num-workers", type=int, help="DataLoader workers per process (default 10; 0 with --demo)")
    g.add_argument("--steps-per-epoch", type=int, help="cap the iterations per epoch (smoke runs)")
    g = parser.add_argument_group("output and distribution")
    g.add_argument("--output-dir", help="checkpoints and metrics.jsonl")
    g.add_argument("--save-every", type=int, help="checkpoint every N epochs, and at the end (default 20)")
    g.add_argument("--keep-checkpoints", type=int, default=0, help="keep only the newest N (default 0: all)")
    g.add_argument("--resume", help="checkpoint to continue from, or 'auto' for the newest in --output-dir")
    g.add_argument("--eval", action="store_true", help="only evaluate (the --resume or --pretrained weights)")
    g.add_argument("--log-every", type=int, help="iterations between metrics.jsonl lines")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--device", help="default: cuda (the local rank's GPU) if available, else cpu")
    g.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard per Block) instead of DDP")
    g.add_argument("--demo", action="store_true",
                   help="the demo: the encoder of `pretrain --demo` on labelled generated images (the label is "
                        "the background's texture), trained once from the pretrained encoder and once from a "
                        "random one")
    g.add_argument("--demo-images", type=int, nargs=2, default=(DEMO_TRAIN, DEMO_VAL), metavar=("TRAIN", "VAL"),
                   help=argparse.SUPPRESS)
    g.add_argument("--no-random-baseline", action="store_true",
                   help="with --demo: skip the run from a randomly initialised encoder")
    g.add_argument("--dump-rank-state", action="store_true", help=argparse.SUPPRESS)  # tests: per-rank weights
    return parser


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    mode = args.mode
    recipe = FINETUNE_RECIPES.get(args.model, {}) if mode == "finetune" and not args.demo else {}
    layers = [DEMO_DEFAULTS[mode] if args.demo else {}, recipe, DEFAULTS[mode]]
    for key in {k for layer in layers for k in layer}:
        if getattr(args, key, None) is None:
            setattr(args, key, next(layer[key] for layer in layers if key in layer))
    if getattr(args, "trainable_blocks", None) is None:
        args.trainable_blocks = None if mode == "finetune" else 0
    return args


# ---------------------------------------------------------------------------- data
def eval_transform(size: int) -> data_mod.EvalTransform:
    """The authors' evaluation transform: the shorter side resized to ``size / crop_pct``
    (``crop_pct = 224/256`` up to 224 px, else 1), bicubic, centre crop ``size``, normalise."""
    return data_mod.EvalTransform(size, resize=int(size / (224 / 256)) if size <= 224 else size)


def build_train_transform(args) -> tuple[object, list[str]]:
    """The training transform and what of the recipe it had to skip. RandomResizedCrop (bicubic) +
    flip always; RandAugment (``--aa``) and random erasing (``--reprob``) through timm's
    ``create_transform`` when timm and torchvision import."""
    wants = [w for w, on in ((f"RandAugment ({args.aa})", args.aa not in (None, "", "none")),
                             (f"random erasing ({args.reprob})", args.reprob > 0)) if on]
    if wants:
        try:
            from timm.data import create_transform
            transform = create_transform(
                input_size=args.input_size, is_training=True, color_jitter=None,
                auto_augment=None if args.aa == "none" else args.aa, interpolation="bicubic", re_prob=args.reprob,
                re_mode="pixel", re_count=1, scale=(args.min_crop_scale, 1.0),
                mean=data_mod.IMAGENET_DEFAULT_MEAN, std=data_mod.IMAGENET_DEFAULT_STD)
            return transform, []
        except Exception as err:  # ImportError, or torchvision's ops failing to register on this torch
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            skipped = [f"{w} skipped: timm/torchvision do not import ({reason})" for w in wants]
    else:
        skipped = []
    return data_mod.PretrainTransform(args.input_size, scale=(args.min_crop_scale, 1.0)), skipped


class _RandomLabels(torch.utils.data.Dataset):
    def __init__(self, images, num_classes: int):
        self.images, self.num_classes = images, num_classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i][0], i % self.num_classes


def build_datasets(args) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, int, list[str]]:
    """``(train, val, num_classes, skipped augmentations)``."""
    transform, skipped = build_train_transform(args)
    evaluate_t = eval_transform(args.input_size)
    if args.demo:
        size = max(96, args.input_size + args.input_size // 2)
        n_train, n_val = args.demo_images
        train = DemoClasses(n_train, size=size, seed=args.seed + 1, transform=transform)
        val = DemoClasses(n_val, size=size, seed=args.seed + 2, transform=evaluate_t)
        return train, val, args.nb_classes or len(DemoClasses.classes), skipped
    if args.synthetic:
        n = args.nb_classes or 1000
        return (_RandomLabels(data_mod.SyntheticImages(args.synthetic, args.input_size, seed=args.seed), n),
                _RandomLabels(data_mod.SyntheticImages(max(args.batch_size, args.synthetic // 10), args.input_size,
                                                       seed=args.seed + 1), n), n, skipped)
    if not args.data_path:
        raise ValueError("give --data-path FOLDER (with train/ and val/, one sub-folder per class), "
                         "or --synthetic N, or --demo")
    train = data_mod.ImageFolder(os.path.join(args.data_path, "train"), transform, on_bad_image=args.on_bad_image)
    val = data_mod.ImageFolder(os.path.join(args.data_path, "val"), evaluate_t, on_bad_image=args.on_bad_image)
    if not train.classes:
        raise ValueError(f"{args.data_path}/train has no class sub-folders: labels come from them")
    if val.classes != train.classes:
        raise ValueError(f"train/ and val/ of {args.data_path} have different class folders")
    return train, val, args.nb_classes or len(train.classes), skipped


def build_loaders(args, info: DistInfo):
    """Train loader (shuffled, split over the ranks, last partial batch dropped), val loader (each
    rank a disjoint share, nothing dropped), iterations per epoch, classes, skipped augmentations."""
    seed_everything(args.seed)
    train, val, num_classes, skipped = build_datasets(args)
    if info.distributed:
        sampler = torch.utils.data.DistributedSampler(train, num_replicas=info.world_size, rank=info.rank,
                                                      shuffle=True, seed=args.seed)
    else:
        sampler = torch.utils.data.RandomSampler(train)
    if len(sampler) < args.batch_size:
        raise ValueError(f"the training set has {len(train)} images, {len(sampler)} per process: fewer than one "
                         f"batch of --batch-size {args.batch_size}")
    pin = info.device.type == "cuda"
    loader = torch.utils.data.DataLoader(train, sampler=sampler, batch_size=args.batch_size,
                                         num_workers=args.num_workers, pin_memory=pin, drop_last=True)
    val_share = torch.utils.data.Subset(val, range(info.rank, len(val), info.world_size))
    val_loader = torch.utils.data.DataLoader(val_share, batch_size=args.batch_size, shuffle=False,
                                             num_workers=args.num_workers, pin_memory=pin, drop_last=False)
    iters = len(loader) if not args.steps_per_epoch else min(len(loader), args.steps_per_epoch)
    if iters < args.accum_iter:
        raise ValueError(f"{iters} iterations per epoch are fewer than --accum-iter {args.accum_iter}")
    return loader, val_loader, iters, num_classes, skipped


# ---------------------------------------------------------------------------- model and optimizer
def build_model(args, num_classes: int, pretrained: str | None) -> nn.Module:
    """The classifier of the recipe, from ``pretrained`` (an MAE checkpoint) or a random init;
    for the probe with the BatchNorm head, everything but the head frozen."""
    seed_everything(args.seed)  # without the rank: the same initial weights on every rank
    kwargs = dict(img_size=args.input_size, num_classes=num_classes, global_pool=args.global_pool,
                  backend=args.backend)
    if args.mode == "finetune":
        kwargs["drop_path_rate"] = args.drop_path
    model = models_vit.create_model(args.model, **kwargs)
    if pretrained:
        models_vit.load_mae_checkpoint(model, pretrained)  # head weight: trunc normal std 2e-5
    if args.mode == "linprobe":
        nn.init.trunc_normal_(model.head.weight, std=0.01)  # MoCo v3's, as the authors
        model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    freeze(model, args.trainable_blocks)
    if args.compile:
        model.compile_blocks()
    return model


def freeze(model: nn.Module, trainable_blocks: int | None) -> None:
    """Partial fine-tuning: with ``trainable_blocks = N`` only the last N blocks, the final norm
    (``norm`` / ``fc_norm``) and the head train; ``None`` trains everything. The linear probe is
    N = 0 without the norm: the head alone."""
    if trainable_blocks is None:
        return
    depth = len(model.blocks)
    if not 0 <= trainable_blocks <= depth:
        raise ValueError(f"--trainable-blocks must be in [0, {depth}], got {trainable_blocks}")
    head_only = not isinstance(model.head, nn.Linear)  # the probe's BatchNorm head
    train_prefixes = ["head."] + ([] if head_only else ["norm.", "fc_norm."])
    train_prefixes += [f"blocks.{i}." for i in range(depth - trainable_blocks, depth)]
    for name, p in model.named_parameters():
        p.requires_grad = any(name.startswith(pre) for pre in train_prefixes)


def optimizer_groups(args, model: nn.Module) -> list[dict]:
    """Parameter groups by name: layer-decay AdamW groups (fine-tuning), or the head's one group
    (the probe's LARS)."""
    if args.mode == "linprobe":
        return [{"params": [n for n, p in model.named_parameters() if p.requires_grad]}]
    return param_group_names_lrd(model, args.weight_decay, model.no_weight_decay(), args.layer_decay)


def build_model_and_optimizer(args, info: DistInfo, num_classes: int, pretrained: str | None):
    """Returns ``(model, optimizer, loss_scaler, group_names)``; ``unwrap(model)`` is the bare model."""
    model = build_model(args, num_classes, pretrained).to(info.device)
    names = optimizer_groups(args, model)
    model = wrap_distributed(model, info, fsdp=args.fsdp)
    params = dict(unwrap(model).named_parameters())
    groups = [{**g, "params": [params[n] for n in g["params"]]} for g in names]
    if args.mode == "linprobe":
        optimizer = LARS(groups, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))
    loss_scaler = optim.LossScaler(grad_scaler(model) if args.amp == "fp16" else None)
    return model, optimizer, loss_scaler, [g["params"] for g in names]


def _flat(groups: list[list[str]]) -> tuple[list[str], list[str]]:
    """The names of every group in the optimizer's order, as ``distributed``'s (a, b) pair wants them."""
    return [n for g in groups for n in g], []


def resume(args, model, optimizer, loss_scaler, groups: list[list[str]], log) -> int:
    """Load ``--resume`` (a file or ``auto``) into the model, optimizer and scaler; returns the epoch to start at."""
    ckpt, start_epoch = pretrain.resume_model(args, model, log)
    if start_epoch > 0 and not args.eval:
        theirs = [len(g["params"]) for g in ckpt["optimizer"].get("param_groups", [])]
        if theirs != [len(g) for g in groups]:
            raise ValueError(f"--resume: the checkpoint's optimizer has parameter groups of {theirs} tensors, this "
                             f"run's has {[len(g) for g in groups]} (another --trainable-blocks or model?)")
        load_optimizer_state(model, optimizer, ckpt["optimizer"], _flat(groups))
        loss_scaler.load_state_dict(ckpt.get("scaler"))
    return start_epoch


# ---------------------------------------------------------------------------- train and evaluate
def build_criterion(args, num_classes: int):
    """``(mixup_fn or None, criterion)`` as the authors: soft-target CE under mixup/cutmix (label
    smoothing inside the targets), else label-smoothing CE, else CE."""
    if args.mode == "finetune" and (args.mixup > 0 or args.cutmix > 0):
        mix = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                    switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing, num_classes=num_classes)
        return mix, soft_target_cross_entropy
    return None, nn.CrossEntropyLoss(label_smoothing=args.smoothing)


def _autocast(args, info: DistInfo):
    amp = AMP_DTYPES[args.amp]
    return torch.autocast(info.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def train_one_epoch(model, criterion, loader, optimizer, loss_scaler, epoch: int, iters: int, args, info: DistInfo,
                    log, mixup_fn=None) -> dict:
    """One epoch (the authors' ``engine_finetune.train_one_epoch``): the lr set at every step's
    fractional epoch, mixup on the device, a step every ``--accum-iter`` iterations."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    sched = dict(lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, epochs=args.epochs)
    steps = iters // args.accum_iter
    bar = _progress(iters, f"epoch {epoch}/{args.epochs}", info.is_main and not args.no_progress)
    t0, losses, lr = time.time(), [], args.lr
    trainable = [p for p in model.parameters() if p.requires_grad]
    for it, (samples, targets) in enumerate(loader):
        if it >= steps * args.accum_iter:
            break
        if it % args.accum_iter == 0:
            lr = optim.adjust_learning_rate(optimizer, it / iters + epoch, **sched)
        samples = samples.to(info.device, non_blocking=True)
        targets = targets.to(info.device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        update = (it + 1) % args.accum_iter == 0
        with no_sync(model, info, update):
            with _autocast(args, info):
                loss = criterion(model(samples), targets)
            loss_value = all_reduce_mean(loss.item(), info)
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f"the loss is {loss_value} at epoch {epoch}, iteration {it}: stopping")
            loss_scaler(loss / args.accum_iter, optimizer, clip_grad=args.clip_grad, parameters=trainable,
                        update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss_value)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if (it + 1) % args.log_every == 0:
            log.write(kind="iter", epoch=epoch, iter=it + 1, loss=loss_value, lr=lr)
    if bar is not None:
        bar.close()
    seconds = time.time() - t0
    return dict(losses=losses, loss=sum(losses) / max(len(losses), 1), lr=lr, seconds=seconds,
                imgs_per_s=len(losses) * args.batch_size * info.world_size / seconds)


def _all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model, loader, args, info: DistInfo) -> dict:
    """Top-1 / top-5 accuracy (%) and the cross-entropy over the whole validation set (every
    rank's share summed)."""
    sync_buffers(model, info)
    model.eval()
    correct1 = correct5 = loss_sum = n = 0.0
    for samples, targets in loader:
        samples, targets = samples.to(info.device, non_blocking=True), targets.to(info.device, non_blocking=True)
        with _autocast(args, info):
            logits = model(samples)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top.eq(targets[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=-1).sum().item()
        n += len(targets)
    correct1, correct5, loss_sum, n = _all_reduce_sum([correct1, correct5, loss_sum, n], info)
    return dict(acc1=100 * correct1 / max(n, 1), acc5=100 * correct5 / max(n, 1), loss=loss_sum / max(n, 1), n=int(n))


# ---------------------------------------------------------------------------- the run
def train(args: argparse.Namespace, pretrained: str | None = "from-args") -> dict:
    """Fine-tune or probe as ``args`` says; returns a summary (per-epoch accuracies, the best and
    last top-1 / top-5, time, checkpoints). ``pretrained`` overrides ``args.pretrained``."""
    args = resolve_defaults(args)
    if args.epochs < 1 or args.save_every < 1:
        raise ValueError("--epochs and --save-every must be >= 1")
    info = init_distributed(args.device)
    try:
        return _train(args, info, args.pretrained if pretrained == "from-args" else pretrained)
    finally:
        if info.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, info: DistInfo, pretrained: str | None) -> dict:
    t_start = time.time()
    pretrained = None if pretrained in (None, "", "none") else pretrained
    _resolve_amp(args, info.device)
    _batch_sizes(args, info)
    if args.fsdp and not info.distributed:
        raise ValueError("--fsdp needs several processes: start with torchrun --nproc-per-node N")
    if info.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
    log = _Log(os.path.join(args.output_dir, "metrics.jsonl"), info.is_main, t_start)

    loader, val_loader, iters, num_classes, skipped = build_loaders(args, info)
    model, optimizer, loss_scaler, groups = build_model_and_optimizer(args, info, num_classes, pretrained)
    start_epoch = resume(args, model, optimizer, loss_scaler, groups, log)
    mixup_fn, criterion = build_criterion(args, num_classes)
    _print_setup(log, args, info, unwrap(model), len(loader.dataset), iters, num_classes, pretrained, mixup_fn)
    for line in skipped:
        log.print(f"augmentation: {line}")
    if args.eval:
        stats = evaluate(model, val_loader, args, info)
        log.print(f"eval on {stats['n']} images: top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%")
        log.close()
        return dict(history=[], last=stats, best_acc1=stats["acc1"], seconds=time.time() - t_start,
                    checkpoints=[], output_dir=args.output_dir, skipped=skipped, model=unwrap(model))

    history, saved, best = [], [], None
    for epoch in range(start_epoch, args.epochs):
        seed_everything(epoch_seed(args.seed, info.rank, epoch))
        if info.distributed:
            loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, criterion, loader, optimizer, loss_scaler, epoch, iters, args, info, log,
                                mixup_fn)
        ev = evaluate(model, val_loader, args, info)
        best = ev["acc1"] if best is None else max(best, ev["acc1"])
        rec = dict(epoch=epoch, train_loss=stats["loss"], train_lr=stats["lr"], test_acc1=ev["acc1"],
                   test_acc5=ev["acc5"], test_loss=ev["loss"], test_images=ev["n"],
                   imgs_per_s=stats["imgs_per_s"], epoch_time=stats["seconds"])
        history.append(rec)
        log.write(kind="epoch", **rec)
        log.print(f"epoch {epoch}: loss {stats['loss']:.4f}  lr {stats['lr']:.3g}  val top-1 {ev['acc1']:.2f}%  "
                  f"top-5 {ev['acc5']:.2f}%  ({stats['seconds']:.1f}s, {stats['imgs_per_s']:.0f} img/s)")
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
            # pretrain's writer: the authors' layout, rank 0, atomic; our groups as one flat name list
            path = pretrain.save_checkpoint(model, optimizer, loss_scaler, epoch, args, info, _flat(groups))
            if path:
                saved.append(path)
    if args.dump_rank_state:
        save_rank_state(model, args.output_dir, info)
    log.close()
    last = dict(acc1=history[-1]["test_acc1"], acc5=history[-1]["test_acc5"]) if history else None
    return dict(history=history, last=last, best_acc1=best, seconds=time.time() - t_start, checkpoints=saved,
                output_dir=args.output_dir, skipped=skipped, model=unwrap(model))


def _print_setup(log, args, info, module, n_images, iters, num_classes, pretrained, mixup_fn) -> None:
    n_params = sum(p.numel() for p in module.parameters())
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    what = f"from {pretrained}" if pretrained else "from a random init"
    extra = ""
    if args.mode == "finetune":
        extra = (f"; layer decay {args.layer_decay}, drop path {args.drop_path}, smoothing {args.smoothing}, "
                 + (f"mixup {args.mixup} / cutmix {args.cutmix}" if mixup_fn else "no mixup"))
    log.print(f"{args.mode} {args.model} {what} ({n_params / 1e6:.2f}M parameters, {n_train / 1e6:.3f}M trained) "
              f"at {args.input_size}px on {info.device}"
              f"{' x ' + str(info.world_size) + (' (FSDP2)' if args.fsdp else ' (DDP)') if info.distributed else ''}; "
              f"{num_classes} classes, {n_images} images, {iters} iterations/epoch; batch {args.batch_size}/process "
              f"x accum {args.accum_iter} x {info.world_size} = {args.effective_batch_size}; lr {args.lr:.3g} "
              f"(blr {args.blr:.3g}); amp {args.amp}{extra}")


# ---------------------------------------------------------------------------- the demo
def demo_pretrained_checkpoint(args) -> str:
    """``--pretrained``, else the newest checkpoint of ``pretrain --demo``'s folder."""
    if args.pretrained and args.pretrained != "none":
        return args.pretrained
    found = checkpoint_epochs(DEMO_PRETRAIN_DIR)
    if not found:
        raise FileNotFoundError(f"no pretrained demo checkpoint in {DEMO_PRETRAIN_DIR}: run `mae-fast pretrain "
                                f"--demo` first (a few minutes), or give --pretrained CKPT")
    return found[-1][1]


def run_demo(args) -> dict:
    """The end-to-end proof: the same recipe from the pretrained encoder and from a random one."""
    ckpt = demo_pretrained_checkpoint(args)
    out = args.output_dir or DEMO_DEFAULTS[args.mode]["output_dir"]
    runs = {"pretrained": ckpt} | ({} if args.no_random_baseline else {"random": None})
    results = {}
    info = init_distributed(args.device)  # once for both runs: a process group is not started twice
    try:
        for name, source in runs.items():
            run_args = argparse.Namespace(**{**vars(args), "output_dir": os.path.join(out, name)})
            if info.is_main:
                print(f"--- {args.mode} --demo: {name} encoder", flush=True)
            results[name] = train(run_args, pretrained=source)
    finally:
        if info.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
    return results


# ---------------------------------------------------------------------------- entry points
def main(args: argparse.Namespace) -> int:
    name = f"mae-fast {args.mode}"
    t0 = time.time()
    try:
        if args.demo:
            results = run_demo(args)
        else:
            results = {"": train(args)}
    except NonFiniteLossError as err:
        print(f"{name}: stopped: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    for label, r in results.items():
        if r["last"] is not None:
            print(f"{name}{' (' + label + ' encoder)' if label else ''}: val top-1 {r['last']['acc1']:.2f}% "
                  f"(best {r['best_acc1']:.2f}%), top-5 {r['last']['acc5']:.2f}% in {r['seconds']:.0f}s; "
                  f"checkpoints in {r['output_dir']}")
    if args.demo and "random" in results:
        p, q = results["pretrained"]["last"]["acc1"], results["random"]["last"]["acc1"]
        print(f"demo {args.mode}: top-1 {p:.2f}% from the MAE-pretrained encoder vs {q:.2f}% from a randomly "
              f"initialised one ({p - q:+.2f} points; chance {100 / len(DemoClasses.classes):.1f}%), "
              f"{time.time() - t0:.0f}s in all")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mae_fast.finetune", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for mode in MODES:
        add_arguments(sub.add_parser(mode, help=f"{mode} with the authors' recipe"), mode)
    return parser


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
