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
import glob
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from . import data as data_mod
from . import models_mae, optim

# ---------------------------------------------------------------------------- models
DEMO_MODEL = "mae_vit_demo_patch8"
MODELS = models_mae.MODELS


def build_model(name: str, *, input_size: int, norm_pix_loss: bool = False, backend: str | None = None):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name](img_size=input_size, norm_pix_loss=norm_pix_loss, backend=backend)


# ---------------------------------------------------------------------------- arguments
# Defaults, and the demo's: arguments default to None so that the demo can tell what was given.
DEFAULTS = dict(model="mae_vit_large_patch16", input_size=224, batch_size=64, epochs=400, warmup_epochs=40,
                blr=1.5e-4, save_every=20, num_workers=10, output_dir="./output_dir", log_every=20)
DEMO_DEFAULTS = dict(model=DEMO_MODEL, input_size=64, batch_size=64, epochs=12, warmup_epochs=1,
                     blr=4e-3, save_every=4, num_workers=0, output_dir="./mae_demo", log_every=10)
DEMO_IMAGES = 2048


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model")
    g.add_argument("--model", choices=sorted(MODELS), help=f"default {DEFAULTS['model']} ({DEMO_MODEL} with --demo)")
    g.add_argument("--input-size", type=int, help="image size in pixels (default 224; 64 with --demo)")
    g.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed (default 0.75)")
    g.add_argument("--norm-pix-loss", action="store_true", help="per-patch normalised pixels as the target")
    g.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"),
                   help="mae_fast kernel backend (default: MAE_FAST_BACKEND, else auto)")
    g = parser.add_argument_group("optimisation (the authors' recipe)")
    g.add_argument("--batch-size", type=int, help="images per process per iteration (default 64)")
    g.add_argument("--global-batch-size", type=int,
                   help="alternative to --batch-size: images per optimizer step over all processes; must "
                        "divide by (processes x --accum-iter)")
    g.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation iterations (default 1)")
    g.add_argument("--epochs", type=int, help="default 400 (12 with --demo)")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up epochs (default 40; 1 with --demo)")
    g.add_argument("--lr", type=float, help="absolute lr (default: blr x effective batch / 256)")
    g.add_argument("--blr", type=float, help="base lr per 256 images (default 1.5e-4; 4e-3 with --demo)")
    g.add_argument("--min-lr", type=float, default=0.0, help="lr floor of the cosine (default 0)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="default 0.05 (matrices only)")
    g.add_argument("--decay-tokens", action="store_true",
                   help="also decay cls/mask tokens, as the authors' timm add_weight_decay does")
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
    g.add_argument("--num-workers", type=int, help="DataLoader workers per process (default 10; 0 with --demo)")
    g.add_argument("--steps-per-epoch", type=int, help="cap the iterations per epoch (smoke/throughput runs)")
    g = parser.add_argument_group("output and distribution")
    g.add_argument("--output-dir", help="checkpoints and metrics.jsonl (default ./output_dir; ./mae_demo with --demo)")
    g.add_argument("--save-every", type=int, help="checkpoint every N epochs, and at the end (default 20)")
    g.add_argument("--keep-checkpoints", type=int, default=0,
                   help="keep only the newest N checkpoint-*.pth (default 0: keep all)")
    g.add_argument("--resume", help="checkpoint to continue from, or 'auto' for the newest in --output-dir")
    g.add_argument("--log-every", type=int, help="iterations between metrics.jsonl lines (default 20)")
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


# ---------------------------------------------------------------------------- distribution
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_arg: str | None) -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and start the process group:
    NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local)
    else:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device_arg} asked for, but CUDA is not available")
        torch.cuda.set_device(device)
    info = DistInfo(rank, world, local, device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        info.initialized_here = True
    return info


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.item() / info.world_size


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


# ---------------------------------------------------------------------------- checkpoints
def plain_args(args: argparse.Namespace, **extra) -> dict:
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


DEFAULT_SCALER_STATE = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                        "growth_interval": 2000, "_growth_tracker": 0}


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path.tmp`` in the same folder, fsync, then rename over ``path``: a crash
    mid-write never leaves a truncated checkpoint under the real name."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_epochs(output_dir: str) -> list[tuple[int, str]]:
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")):
        m = re.fullmatch(r"checkpoint-(\d+)\.pth", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def ids_from_fqns(osd: dict, groups: tuple[list[str], list[str]]) -> dict:
    """An optimizer state dict keyed by parameter names (``torch.distributed.checkpoint``'s full
    state dict) -> the standard one keyed by position, as ``optimizer.state_dict()`` writes it."""
    ids = {name: i for i, name in enumerate(groups[0] + groups[1])}
    return {"state": {ids[k]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [ids[n] for n in g["params"]],
                              **({"betas": tuple(g["betas"])} if "betas" in g else {})}
                             for g in osd["param_groups"]]}


def fqns_from_ids(osd: dict, groups: tuple[list[str], list[str]]) -> dict:
    names = groups[0] + groups[1]
    return {"state": {names[int(k)]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in osd["param_groups"]]}


def read_checkpoint(path: str) -> dict:
    """Read a training checkpoint with ``weights_only=True`` (the authors' pickled Namespace becomes
    an inert placeholder)."""
    from .checkpoint import read_torch_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path!r}")
    obj, _ = read_torch_file(path)
    if not isinstance(obj, dict) or "model" not in obj:
        raise ValueError(f"--resume: {path!r} is not a training checkpoint (no 'model' entry)")
    return obj


def checkpoint_args(ckpt: dict) -> dict:
    a = ckpt.get("args")
    if isinstance(a, dict):
        return a
    state = getattr(a, "state", None)  # the authors' Namespace, read as a placeholder
    return state if isinstance(state, dict) else {}


def check_same_model(ckpt: dict, model: nn.Module, args: argparse.Namespace, path: str) -> None:
    """A clear error when ``ckpt`` holds another model than the one asked for."""
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


# ---------------------------------------------------------------------------- the run
def _amp_dtype(args, device: torch.device):
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; on a CPU use --amp bf16 or none")
    args.amp = amp
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


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


class _Log:
    """Rank 0's JSON-lines metrics log and printing."""

    def __init__(self, path: str | None, enabled: bool):
        self.enabled = enabled
        self.f = open(path, "a") if (enabled and path) else None

    def write(self, **record) -> None:
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def print(self, *a) -> None:
        if self.enabled:
            print(*a, flush=True)

    def close(self) -> None:
        if self.f:
            self.f.close()


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)


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
    device = info.device
    amp_dtype = _amp_dtype(args, device)
    _batch_sizes(args, info)
    if args.fsdp and not info.distributed:
        raise ValueError("--fsdp needs several processes: start with torchrun --nproc-per-node N")
    if info.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
    log = _Log(os.path.join(args.output_dir, "metrics.jsonl"), info.is_main)

    # ---- data (the same data set on every rank; the sampler splits it)
    seed_everything(args.seed)
    dataset = data_mod.build_dataset(data_path=args.data_path, input_size=args.input_size,
                                     synthetic=args.synthetic, demo=args.demo_images if args.demo else 0,
                                     on_bad_image=args.on_bad_image, seed=args.seed)
    if info.distributed:
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
        pin_memory=device.type == "cuda", drop_last=True,
        # not persistent: workers are re-created (and re-seeded) each epoch from the epoch's seed,
        # so a resumed run draws the same crops as one never interrupted
        persistent_workers=False)
    iters = len(loader) if not args.steps_per_epoch else min(len(loader), args.steps_per_epoch)
    if iters < args.accum_iter:
        raise ValueError(f"{iters} iterations per epoch are fewer than --accum-iter {args.accum_iter}")

    # ---- model: the same initial weights on every rank (seed without rank)
    seed_everything(args.seed)
    model = build_model(args.model, input_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                        backend=args.backend)
    groups = optim.param_group_names(model, decay_tokens=args.decay_tokens)
    start_epoch, ckpt = 0, None
    resume = args.resume
    if resume == "auto":
        found = checkpoint_epochs(args.output_dir)
        resume = found[-1][1] if found else None
        if resume is None:
            log.print(f"--resume auto: no checkpoint in {args.output_dir}, starting afresh")
    if resume:
        ckpt = read_checkpoint(resume)
        check_same_model(ckpt, model, args, resume)
        model.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["model"].items()})
        if "epoch" in ckpt and "optimizer" in ckpt:
            start_epoch = int(ckpt["epoch"]) + 1
        log.print(f"resumed from {resume}: next epoch {start_epoch}")
    model.to(device)
    module = model  # the unwrapped model (authors: model_without_ddp)

    if args.fsdp:
        import warnings

        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # forward returns pred as a slice (x[:, 1:]) as the reference does; nothing here edits it in place
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")

        # An explicit mesh of our device type: left to itself, FSDP2 picks CUDA whenever it is
        # available (and fails on a 1-GPU machine running CPU ranks).
        mesh = init_device_mesh(device.type, (info.world_size,))
        for blk in (*model.blocks, *model.decoder_blocks):
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    named = dict(module.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [named[n] for n in groups[0]], "weight_decay": 0.0},
         {"params": [named[n] for n in groups[1]], "weight_decay": args.weight_decay}],
        lr=args.lr, betas=(0.9, 0.95))
    scaler = None
    if amp_dtype == torch.float16:
        if args.fsdp:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler()
        else:
            scaler = torch.amp.GradScaler("cuda")
    if ckpt is not None and start_epoch > 0:
        theirs = [len(g["params"]) for g in ckpt["optimizer"].get("param_groups", [])]
        ours = [len(g) for g in groups]
        if theirs != ours:
            hint = (" (the authors' code also decays the cls/mask tokens: add --decay-tokens)"
                    if not args.decay_tokens and theirs == [ours[0] - 2, ours[1] + 2] else "")
            raise ValueError(f"--resume: the checkpoint's optimizer has parameter groups of {theirs} tensors, "
                             f"this run's has {ours}{hint}")
        if args.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, fqns_from_ids(ckpt["optimizer"], groups),
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    ckpt = None

    n_params = sum(p.numel() for p in module.parameters())
    log.print(f"model {args.model} ({n_params / 1e6:.2f}M parameters) at {args.input_size}px on {device}"
              f"{' x ' + str(info.world_size) + (' (FSDP2)' if args.fsdp else ' (DDP)') if info.distributed else ''}; "
              f"{len(dataset)} images, {iters} iterations/epoch; batch {args.batch_size}/process x accum "
              f"{args.accum_iter} x {info.world_size} = {args.effective_batch_size}; lr {args.lr:.3g} "
              f"(blr {args.blr:.3g}); amp {args.amp}")
    if start_epoch >= args.epochs:
        log.print(f"nothing to do: the checkpoint finished epoch {start_epoch - 1} of {args.epochs}")

    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    sched = dict(lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, epochs=args.epochs)
    losses: list[float] = []
    epoch_losses: list[float] = []
    saved: list[str] = []
    step = start_epoch * (iters // args.accum_iter)
    for epoch in range(start_epoch, args.epochs):
        seed_everything(epoch_seed(args.seed, info.rank, epoch))
        if info.distributed:
            sampler.set_epoch(epoch)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        bar = _progress(iters, f"epoch {epoch}/{args.epochs}", info.is_main and not args.no_progress)
        t_epoch, total, n_total, lr = time.time(), 0.0, 0, sched["lr"]
        # the last iterations that cannot fill an accumulation are skipped (the authors compute and drop them)
        n_iters = iters - iters % args.accum_iter
        for it, (samples, _) in enumerate(loader):
            if it >= n_iters:
                break
            if it % args.accum_iter == 0:
                lr = optim.adjust_learning_rate(optimizer, it / iters + epoch, **sched)
            samples = samples.to(device, non_blocking=True)
            update = (it + 1) % args.accum_iter == 0
            with _no_sync(model, args, info, update), autocast:
                loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
            loss_value = all_reduce_mean(loss.item(), info)  # every rank sees the same value: all stop together
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"the loss is {loss_value} at epoch {epoch}, iteration {it}: stopping (the last checkpoint "
                    f"is intact). Try a lower --blr, --amp bf16 instead of fp16, or --clip-grad")
            with _no_sync(model, args, info, update):
                if scaler is not None:
                    scaler.scale(loss / args.accum_iter).backward()
                else:
                    (loss / args.accum_iter).backward()
            if update:
                if scaler is not None:
                    if args.clip_grad:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    if args.clip_grad:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            losses.append(loss_value)
            total += loss_value
            n_total += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if (it + 1) % args.log_every == 0:
                log.write(kind="iter", epoch=epoch, iter=it + 1, step=step, loss=loss_value, lr=lr,
                          time=round(time.time() - t_start, 3))
        if bar is not None:
            bar.close()
        seconds = time.time() - t_epoch
        epoch_loss = total / max(n_total, 1)
        epoch_losses.append(epoch_loss)
        log.write(kind="epoch", epoch=epoch, train_loss=epoch_loss, train_lr=lr, step=step,
                  imgs_per_s=n_total * args.batch_size * info.world_size / seconds, epoch_time=seconds,
                  time=round(time.time() - t_start, 3))
        log.print(f"epoch {epoch}: loss {epoch_loss:.4f}  lr {lr:.3g}  {seconds:.1f}s  "
                  f"{n_total * args.batch_size * info.world_size / seconds:.0f} img/s")
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
            path = save_checkpoint(model, module, optimizer, scaler, epoch, args, info, groups)
            if path:
                saved.append(path)
                log.print(f"saved {path}")
    if args.dump_rank_state:
        torch.save({k: v.detach().cpu() for k, v in _full_state(model, module, args).items()},
                   os.path.join(args.output_dir, f"rank{info.rank}_state.pt"))
    log.close()
    summary = dict(first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                   epoch_losses=epoch_losses, epochs=args.epochs, start_epoch=start_epoch,
                   seconds=time.time() - t_start, checkpoints=saved, output_dir=args.output_dir,
                   losses=losses, model=module)
    return summary


def _no_sync(model, args, info: DistInfo, update: bool):
    """Skip the gradient all-reduce on accumulation iterations that do not step."""
    if update or not info.distributed:
        return contextlib.nullcontext()
    if args.fsdp:
        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return model.no_sync()


def _full_state(model, module, args) -> dict:
    """The full (unsharded) model state dict; a collective under FSDP."""
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return module.state_dict()


def save_checkpoint(model, module, optimizer, scaler, epoch: int, args, info: DistInfo, groups) -> str | None:
    """Rank 0 writes ``checkpoint-<epoch>.pth`` (the authors' layout) atomically; returns its path
    (None on other ranks). Under FSDP every rank takes part in gathering the full state."""
    state = _full_state(model, module, args)
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(model, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        osd = ids_from_fqns(osd, groups) if info.is_main else None
    else:
        osd = optimizer.state_dict() if info.is_main else None
    path = None
    if info.is_main:
        ckpt = {
            "model": {k: v.detach().cpu() for k, v in state.items()},
            "optimizer": osd,
            "epoch": epoch,
            # the authors' loader always loads a scaler state: a disabled scaler writes the default one
            "scaler": scaler.state_dict() if scaler is not None else dict(DEFAULT_SCALER_STATE),
            "args": plain_args(args, world_size=info.world_size),
        }
        path = os.path.join(args.output_dir, f"checkpoint-{epoch}.pth")
        atomic_save(ckpt, path)
        if args.keep_checkpoints > 0:
            for _, old in checkpoint_epochs(args.output_dir)[:-args.keep_checkpoints]:
                os.remove(old)
    if info.distributed:
        dist.barrier()
    return path


# ---------------------------------------------------------------------------- the demo's ending
def demo_reconstruction(checkpoint: str, args, n: int = 4) -> tuple[str, str]:
    """Reconstruct ``n`` held-out generated images (a seed the training set never used) with the
    last checkpoint; writes their PNGs and one grid PNG into the output folder. Returns
    (grid path, images folder)."""
    from . import reconstruct

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
