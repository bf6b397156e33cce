"""How fast is the input pipeline, and is it or the model the bottleneck?

    mae-fast bench --data /data/imagenet/train --workers 0,2,16        (python -m mae_fast.loader_bench ...)
    mae-fast bench --synthetic-jpeg 256                                 (writes ImageNet-like JPEGs itself)

Three measurements:

1. **per stage, one core**: the authors' pipeline on ``--images`` files, each stage timed apart:
   read (file -> bytes), decode (JPEG -> pixels; in draft mode at the reduced DCT scale), crop +
   resize (RandomResizedCrop's draw, bicubic resize, flip), to-tensor/normalise (host float
   ToTensor + Normalize as the authors; or the uint8 tensor our loader sends), collate (stacking a
   batch) and host-to-device (a pinned copy; only on a GPU). img/s of each stage alone and of all;
   per ``--decode`` path (exact, draft).
2. **the DataLoader** (what training runs: :class:`~mae_fast.data.ImageFolder` + the transform,
   batches, pinned memory, the copy to the device and the normalisation there) for each worker count
   of ``--workers``: img/s end to end, and per worker.
3. **the model's step rate** (``--model``; forward, backward and AdamW step on resident random images).

Then which is the bottleneck, and how many workers would keep up at the measured per-worker rate.
With ``--decode draft`` also the pixel difference to the exact path on the same crops and flips.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

from . import data as data_mod

STAGES = ("read", "decode", "crop_resize", "to_tensor", "collate", "h2d")
STAGE_TITLES = {"read": "read", "decode": "decode", "crop_resize": "crop+resize+flip",
                "to_tensor": "to-tensor/normalise", "collate": "collate", "h2d": "host-to-device"}


# ---------------------------------------------------------------------------- synthetic JPEGs
def write_synthetic_jpegs(folder: str, n: int, seed: int = 0, quality: int = 90) -> list[str]:
    """``n`` ImageNet-like JPEGs (500x375, one in four 375x500; smooth colour fields, shapes with
    sharp edges and a fine texture, quality 90: ~60-120 KB, as ImageNet's average) into ``folder``."""
    Image = data_mod._pil()
    from PIL import ImageDraw, ImageFilter

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        w, h = (375, 500) if k % 4 == 3 else (500, 375)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB").resize((w, h), Image.BICUBIC)
        img = np.asarray(coarse, dtype=np.float32)
        noise = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").filter(ImageFilter.GaussianBlur(0.8))
        img = img + (np.asarray(noise, dtype=np.float32)[..., None] - 128.0) * 0.45
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(3, 9))):
            color = tuple(int(v) for v in rng.integers(0, 256, 3))
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.25) * min(w, h)
            if rng.integers(0, 2):
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
            else:
                draw.rectangle([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=color)
        path = os.path.join(folder, f"synthetic_{k:05d}.JPEG")
        pil.save(path, quality=quality)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------- 1. per stage
def measure_stages(paths: list[str], transform: data_mod.PretrainTransform, *, batch_size: int, device: str,
                   host_float: bool, seed: int = 0, decoder: str = "auto") -> dict:  # noqa: C901
    """Seconds per stage over ``paths`` (one process, one core); returns img/s per stage and of all."""
    Image = data_mod._pil()
    torch.manual_seed(seed)
    t = dict.fromkeys(STAGES, 0.0)
    batch, n_batches, draws, t_aug = [], 0, [], 0.0
    for path in paths:
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            buf = f.read()
        t1 = time.perf_counter()
        img = data_mod.decode_image(buf, lazy=transform.draft, decoder=decoder)
        width, height = img.size
        i, j, h, w = data_mod.random_resized_crop_params(width, height, transform.scale, transform.ratio)
        box = (j, i, j + w, i + h)
        k = data_mod.draft_factor(w, h, transform.size) if transform.draft and img.format == "JPEG" else 1
        if k > 1:
            img.draft(img.mode, (width // k, height // k))
            sx, sy = img.size[0] / width, img.size[1] / height
            box = (j * sx, i * sy, (j + w) * sx, (i + h) * sy)
        img.load()
        img = data_mod.to_mode(img, transform.channels)
        t2 = time.perf_counter()
        on_device = isinstance(transform, data_mod.DeviceAugmentTransform)
        if on_device:  # the worker only draws; the crop is done after the copy
            flip = torch.rand(1).item() < transform.hflip
            draws.append(torch.tensor([i, j, h, w, int(flip)], dtype=torch.int32))
        else:
            img = img.resize((transform.size, transform.size), Image.BICUBIC, box=box)
            if torch.rand(1).item() < transform.hflip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        t3 = time.perf_counter()
        x = data_mod.to_uint8_hwc(img, transform.channels) if on_device else data_mod.to_uint8(img, transform.channels)
        if host_float:
            x = data_mod.normalize(x.float().div_(255.0), transform.mean, transform.std)
        t4 = time.perf_counter()
        batch.append(x)
        t["read"] += t1 - t0
        t["decode"] += t2 - t1
        t["crop_resize"] += t3 - t2
        t["to_tensor"] += t4 - t3
        if len(batch) == batch_size:
            t5 = time.perf_counter()
            if on_device:
                stacked = data_mod.collate_device([((x, d), 0) for x, d in zip(batch, draws)])[0]
            else:
                stacked = torch.stack(batch)
            t6 = time.perf_counter()
            t["collate"] += t6 - t5
            if device.startswith("cuda"):
                pinned = [v.pin_memory() for v in stacked] if on_device else stacked.pin_memory()
                torch.cuda.synchronize()
                t7 = time.perf_counter()
                y = data_mod.prepare_batch(pinned if on_device else pinned, device, transform.size,
                                           transform.mean, transform.std) if not host_float else pinned.to(device)
                torch.cuda.synchronize()
                t["h2d"] += time.perf_counter() - t7
            elif on_device:  # no GPU: the device's crop+resize timed on this CPU, for information
                t7 = time.perf_counter()
                data_mod.prepare_batch(stacked, device, transform.size, transform.mean, transform.std)
                t_aug += time.perf_counter() - t7
            batch, draws, n_batches = [], [], n_batches + 1
    n = len(paths)
    nb = max(n_batches * batch_size, 1)
    per_img = {s: (t[s] / (nb if s in ("collate", "h2d") else n)) for s in STAGES}
    rates = {s: (1.0 / v if v > 0 else None) for s, v in per_img.items()}
    if not device.startswith("cuda"):
        rates["h2d"] = None
    total = sum(per_img.values())
    return {"img_per_s": rates, "all_img_per_s": 1.0 / total if total else None,
            "device_augment_on_cpu_img_per_s": nb / t_aug if t_aug else None,
            "ms_per_img": {s: 1e3 * v for s, v in per_img.items()}, "images": n}


# ---------------------------------------------------------------------------- 2. the DataLoader
def measure_loader(folder: str, transform, *, workers: int, batch_size: int, batches: int, device: str,
                   prefetch_factor: int = 2, decoder: str = "auto") -> dict:
    """img/s of the training loader (ImageFolder + transform, shuffled, pinned on a GPU, copied to
    ``device`` and normalised there), after the first batch (worker start-up excluded)."""
    ds = data_mod.ImageFolder(folder, transform, lazy=transform.draft, decoder=decoder)
    on_device = isinstance(transform, data_mod.DeviceAugmentTransform)
    on_gpu = device.startswith("cuda")
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=batch_size * (batches + 1))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                         pin_memory=on_gpu, drop_last=True,
                                         prefetch_factor=prefetch_factor if workers else None,
                                         collate_fn=data_mod.collate_device if on_device else None)
    t0, seen = None, 0
    for x, _ in loader:
        y = data_mod.prepare_batch(x, device, transform.size, transform.mean, transform.std)
        if on_gpu:
            torch.cuda.synchronize()
        if t0 is None:
            t0 = time.perf_counter()
            continue
        seen += y.shape[0]
    seconds = time.perf_counter() - t0
    rate = seen / seconds if seconds > 0 else float("nan")
    return {"workers": workers, "img_per_s": rate, "per_worker": rate / workers if workers else rate,
            "batches": batches, "batch_size": batch_size}


# ---------------------------------------------------------------------------- 3. the model
def measure_model(model_name: str, *, img_size: int, batch_size: int, device: str, steps: int = 5,
                  warmup: int = 2) -> dict:
    """Training step rate (img/s) of ``model_name`` on resident random images: forward, backward,
    AdamW step; bf16 autocast on CUDA."""
    from . import models_mae, optim

    torch.manual_seed(0)
    model = models_mae.create_model(model_name, img_size=img_size).to(device)
    opt = torch.optim.AdamW(optim.param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    on_gpu = device.startswith("cuda")
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)
    for k in range(warmup + steps):
        if k == warmup:
            if on_gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with ctx:
            loss, _, _ = model(x, mask_ratio=0.75)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"model": model_name, "batch_size": batch_size, "img_per_s": steps * batch_size / seconds,
            "dtype": "bf16" if on_gpu else "fp32"}


# ---------------------------------------------------------------------------- pixel difference
def pixel_difference(paths: list[str], size: int, path: str = "draft", seed: int = 0) -> dict:
    """A faster path (``simplejpeg``: the exact path with that decoder, against PIL's; ``draft``;
    ``device``) against the exact one on the same crop and flip draws: |difference| in 0-255 units (mean, 99th percentile, max), PSNR, over the pixels."""
    exact = data_mod.PretrainTransform(size, output="uint8")
    diffs, reduced = [], 0
    for k, p in enumerate(paths):
        torch.manual_seed(seed + k)
        a = exact(data_mod.open_image(p)).float()
        torch.manual_seed(seed + k)
        if path == "simplejpeg":
            b = exact(data_mod.open_image(p, decoder="simplejpeg")).float()
            torch.manual_seed(seed + k)
            a = exact(data_mod.open_image(p, decoder="pil")).float()
        elif path == "device":
            img, draws = data_mod.DeviceAugmentTransform(size)(data_mod.open_image(p))
            b = data_mod.denormalize(data_mod.device_augment(img[None], draws[None], size)[0]) * 255.0
        else:
            img = data_mod.open_image(p, lazy=True)
            b = data_mod.PretrainTransform(size, output="uint8", draft=True)(img).float()
            reduced += img.size != data_mod.open_image(p).size  # decoded at a smaller DCT scale
        diffs.append((a - b).abs().flatten())
    d = torch.cat(diffs)
    mse = float((d ** 2).mean())
    return {"mean_abs": float(d.mean()), "p99_abs": float(torch.quantile(d[:: max(1, d.numel() // 1_000_000)], 0.99)),
            "max_abs": float(d.max()), "psnr_db": 10 * math.log10(255.0 ** 2 / mse) if mse > 1e-12 else float("inf"),
            "images": len(paths), "drafted": int(reduced)}


# ---------------------------------------------------------------------------- the command
# what ``mae-fast bench`` already has, and our names for them
BENCH_SHARED = {"model": "model", "device": "device", "json": "json", "img_size": "input_size",
                "batch_size": "model_batch_size"}


def add_arguments(parser: argparse.ArgumentParser, *, within_bench: bool = False) -> argparse.ArgumentParser:
    """The options; ``within_bench``: only those ``mae-fast bench`` lacks (it has --model, --device,
    --json, --img-size, --batch-size: :func:`from_bench_args` maps them)."""
    g = parser.add_argument_group("input pipeline (mae-fast bench --data / --synthetic-jpeg)")
    g.add_argument("--data", help="image folder to measure the loader on (flat or class sub-folders)")
    g.add_argument("--synthetic-jpeg", type=int, metavar="N",
                   help="write N ImageNet-like JPEGs (500x375) to a temporary folder and measure on them")
    g.add_argument("--jpeg-dir", help="with --synthetic-jpeg: write them here (kept) instead of a temporary folder")
    g.add_argument("--workers", default=None,
                   help="DataLoader worker counts to measure, comma-separated (default: 0,<cores>)")
    g.add_argument("--decode", default="exact,draft,device",
                   help="paths to measure: exact (PIL, the authors' pixels), draft (JPEG draft mode), device (workers "
                        "decode only, crop+resize on the device); default all three")
    g.add_argument("--loader-batch-size", type=int, default=64, help="batch of the loader (default 64)")
    g.add_argument("--loader-batches", type=int, default=None,
                   help="batches timed per worker count (default: enough for ~2 passes of the workers)")
    g.add_argument("--images", type=int, default=256, help="images for the per-stage pass (default 256)")
    g.add_argument("--rounds", type=int, default=2,
                   help="rounds over all paths, interleaved; each figure is the best of its rounds (default 2)")
    if within_bench:
        return parser
    g.add_argument("--input-size", type=int, default=224, help="crop size (default 224)")
    g.add_argument("--model", help="model for the step rate (default mae_vit_large_patch16 on a GPU, "
                                   "mae_vit_tiny_patch16 on a CPU; 'none' to skip)")
    g.add_argument("--model-batch-size", type=int, help="default 64 on a GPU, 8 on a CPU")
    g.add_argument("--device", help="default cuda if available, else cpu")
    g.add_argument("--json", help="also write the results here")
    return parser


def _best(old: dict | None, new: dict) -> dict:
    """Per stage, the faster of two measurements (and the 'all' of the faster total)."""
    if old is None:
        return new
    out = dict(new)
    out["img_per_s"] = {s: max((v for v in (old["img_per_s"][s], new["img_per_s"][s]) if v), default=None)
                        for s in STAGES}
    for key in ("all_img_per_s", "device_augment_on_cpu_img_per_s"):
        out[key] = max((v for v in (old.get(key), new.get(key)) if v), default=None)
    return out


def _transform(decode: str, size: int, output: str):
    if decode == "device":
        return data_mod.DeviceAugmentTransform(size)
    return data_mod.PretrainTransform(size, output=output, draft=decode == "draft")


def from_bench_args(args: argparse.Namespace) -> argparse.Namespace:
    """``mae-fast bench --data ...``'s namespace -> this module's."""
    ours = vars(add_arguments(argparse.ArgumentParser()).parse_args([]))
    ours.update({k: v for k, v in vars(args).items() if k in ours})
    for theirs, mine in BENCH_SHARED.items():
        ours[mine] = getattr(args, theirs, None) if getattr(args, theirs, None) is not None else ours[mine]
    return argparse.Namespace(**ours)


def run(args) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    paths_dir = args.data
    tmp = None
    if args.synthetic_jpeg:
        if args.jpeg_dir:
            paths_dir = args.jpeg_dir
        else:
            tmp = tempfile.TemporaryDirectory(prefix="mae_fast_jpegs_")
            paths_dir = tmp.name
        write_synthetic_jpegs(paths_dir, args.synthetic_jpeg)
    if not paths_dir:
        raise ValueError("give --data FOLDER or --synthetic-jpeg N")
    try:
        paths = data_mod.find_images(paths_dir)[0]
        sample = [paths[k % len(paths)] for k in range(args.images)]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = [int(w) for w in (args.workers or f"0,{cores}").split(",") if w.strip()]
        decodes = [d.strip() for d in args.decode.split(",") if d.strip()]
        bad = [d for d in decodes if d not in ("exact", "draft", "device")]
        if bad:
            raise ValueError(f"--decode takes exact, draft and/or device, got {bad}")
        sizes = [f"{w}x{h}" for w, h in {data_mod._pil().open(p).size for p in paths[:50]}]
        result = {"device": device, "cores": cores, "folder": paths_dir, "files": len(paths),
                  "input_size": args.input_size, "sizes": sorted(sizes)[:6], "stages": {}, "loader": {}}
        stage_runs, loader_runs = [], []  # (name, transform, host float, decoder)
        fast = data_mod.jpeg_decoder("auto")
        for decode in decodes:
            if decode == "exact":
                stage_runs.append(("before: exact, pil, host float (the authors)", _transform(decode, args.input_size, "uint8"),
                                   True, "pil"))
                loader_runs.append(("before: exact, pil, host float", _transform(decode, args.input_size, "float"), "pil"))
            decoder = "pil" if decode == "draft" else fast
            name = {"exact": f"exact, {decoder}, uint8", "draft": "draft, pil, uint8",
                    "device": f"device, {decoder}: decode only, crop+resize after the copy"}[decode]
            stage_runs.append((name, _transform(decode, args.input_size, "uint8"), False, decoder))
            loader_runs.append((name.split(":")[0], _transform(decode, args.input_size, "uint8"), decoder))
        # rounds interleave the paths, and each figure is the best of its rounds: on a shared machine
        # the load changes from minute to minute, and this keeps the comparison between paths fair
        for _ in range(max(1, args.rounds)):
            for name, tr, host_float, decoder in stage_runs:
                r = measure_stages(sample, tr, batch_size=args.loader_batch_size, device=device, host_float=host_float,
                                   decoder=decoder)
                result["stages"][name] = _best(result["stages"].get(name), r)
            for key, tr, decoder in loader_runs:
                rows = result["loader"].setdefault(key, [None] * len(workers))
                for k, w in enumerate(workers):
                    batches = args.loader_batches or max(4, 2 * max(w, 1) * 2)
                    r = measure_loader(paths_dir, tr, workers=w, batches=batches, batch_size=args.loader_batch_size,
                                       device=device, decoder=decoder)
                    rows[k] = r if rows[k] is None or r["img_per_s"] > rows[k]["img_per_s"] else rows[k]
        result["rounds"] = max(1, args.rounds)
        for decode in ("simplejpeg", "draft", "device"):
            if decode in decodes or (decode == "simplejpeg" and fast == "simplejpeg"):
                result.setdefault("pixel_difference", {})[decode] = pixel_difference(sample[:64], args.input_size,
                                                                                    decode)
        model = args.model or ("mae_vit_large_patch16" if on_gpu else "mae_vit_tiny_patch16")
        if model != "none":
            result["model"] = measure_model(model, img_size=args.input_size, device=device,
                                            batch_size=args.model_batch_size or (64 if on_gpu else 8),
                                            steps=10 if on_gpu else 2, warmup=3 if on_gpu else 1)
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_report(r: dict) -> str:
    lines = [f"input pipeline on {r['device']} ({r['cores']} cores): {r['files']} files in {r['folder']} "
             f"(sizes {', '.join(r['sizes'])}), crops {r['input_size']}px; best of {r.get('rounds', 1)} "
             f"interleaved rounds",
             "", "1. per stage, one core (img/s of each stage alone; 'all' = one core doing every stage)"]
    head = f"  {'path':52s}" + "".join(f"{STAGE_TITLES[s]:>20s}" for s in STAGES) + f"{'all':>10s}"
    lines.append(head)
    for name, st in r["stages"].items():
        cells = "".join(f"{(f'{v:,.0f}' if v else 'n/a'):>20s}" for v in (st["img_per_s"][s] for s in STAGES))
        lines.append(f"  {name:52s}{cells}{st['all_img_per_s']:>10,.0f}")
    lines += ["", "2. the DataLoader (ImageFolder + transform, batches, pinned, to the device; 'before': as "
                  "mae_fast did, float normalised on the host; else uint8 normalised on the device)"]
    for decode, rows in r["loader"].items():
        for row in rows:
            lines.append(f"  {decode:34s} workers {row['workers']:>3d}: {row['img_per_s']:>9,.0f} img/s"
                         + (f"  ({row['per_worker']:,.0f} per worker)" if row["workers"] else "  (in the main process)"))
    for name, st in r["stages"].items():
        if st.get("device_augment_on_cpu_img_per_s"):
            lines.append(f"  ({name}: the crop+resize done on this CPU instead: "
                         f"{st['device_augment_on_cpu_img_per_s']:,.0f} img/s)")
    for path, p in r.get("pixel_difference", {}).items():
        lines += [f"{path} vs exact, same crops and flips ({p['images']} images"
                  + (f", {p['drafted']} decoded at a reduced scale" if path == "draft" else "")
                  + f"): |diff| mean {p['mean_abs']:.2f}, p99 {p['p99_abs']:.0f}, max {p['max_abs']:.0f} "
                  f"(0-255 units); PSNR {p['psnr_db']:.1f} dB"]
    if "model" in r:
        m = r["model"]
        lines += ["", f"3. model {m['model']} training step ({m['dtype']}, batch {m['batch_size']}): "
                      f"{m['img_per_s']:,.1f} img/s"]
        best = max((row for rows in r["loader"].values() for row in rows), key=lambda row: row["img_per_s"])
        if best["img_per_s"] >= m["img_per_s"]:
            verdict = (f"the model is the bottleneck: the best loader ({best['img_per_s']:,.0f} img/s, "
                       f"workers {best['workers']}) is {best['img_per_s'] / m['img_per_s']:.1f}x its step rate")
        else:
            need = math.ceil(m["img_per_s"] / best["per_worker"]) if best["per_worker"] > 0 else None
            verdict = (f"the loader is the bottleneck: {best['img_per_s']:,.0f} img/s (workers {best['workers']}) is "
                       f"{best['img_per_s'] / m['img_per_s']:.2f}x the model's step rate"
                       + (f"; at {best['per_worker']:,.0f} img/s per worker it takes ~{need} workers (cores) to keep up"
                          if need else ""))
        lines.append("   " + verdict)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        result = run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"mae-fast bench: error: {err}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(add_arguments(argparse.ArgumentParser(prog="python -m mae_fast.loader_bench",
                                                        description=__doc__.split("\n\n")[0])).parse_args()))
