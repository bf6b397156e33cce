"""Benchmark the fused packed-QKV attention against its peers at MAE shapes (CUDA only).

    python benchmarks/bench_attention.py [--json OUT.json] [--batch 256] [--dtype bf16] [--kernels auto,tiled,short]

Every implementation takes the same packed qkv (B, N, 3, H, D) (a view of the qkv Linear's output)
and must return (B, N, H*D) contiguous, ready for the proj Linear; so the SDPA peers include the
permute/transpose/reshape copies a timm-style Attention pays. Peers: each SDPA backend that runs
(flash, efficient, cudnn, math, via torch.nn.attention.sdpa_kernel) and flash-attn's
flash_attn_qkvpacked_func when it is importable. Reports the median time, TFLOP/s
(4*B*H*N*N*D forward, 2.5x that for forward+backward), GB/s (the minimum bytes: qkv read and out
written, plus dout read and dqkv written in the backward, and out read for delta) and the ratio of
the best peer's time to ours (> 1: ours is faster).

Ours runs once per kernel family of `--kernels` (rows `mae_fast[tiled]`, `mae_fast[short]`, ...:
MAE_FAST_ATTENTION_KERNELS set around that implementation's calls, which the extension reads at
every call), so one run shows the tiled and the short-sequence kernels side by side; `ratios`
has one entry per family and `kernel_choice` the faster family per (shape, mode).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, N, H, D) at batch 256.
SHAPES = [
    ("vit-b enc", 50, 12, 64),
    ("vit-l enc", 50, 16, 64),
    ("vit-h enc", 65, 16, 80),
    ("decoder", 197, 16, 32),
    ("vit-h/14 dec", 257, 16, 32),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
KERNELS_ENV = "MAE_FAST_ATTENTION_KERNELS"
KERNEL_FAMILIES = ("auto", "tiled", "short")
DEFAULT_KERNELS = ("tiled", "short")


@contextlib.contextmanager
def kernels_env(family):
    """MAE_FAST_ATTENTION_KERNELS=family inside (None: leave it as it is)."""
    if family is None:
        yield
        return
    old = os.environ.get(KERNELS_ENV)
    os.environ[KERNELS_ENV] = family
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(KERNELS_ENV, None)
        else:
            os.environ[KERNELS_ENV] = old


def _ours(name):
    return name == "mae_fast" or name.startswith("mae_fast[")


def _family(name):
    return name[len("mae_fast["):-1] if name.startswith("mae_fast[") else None


def _timm_sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def fn(qkv):
        B, N, _, H, D = qkv.shape
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(B, N, H * D)

    return fn


def implementations(kernels=DEFAULT_KERNELS):
    from torch.nn.attention import SDPBackend

    from mae_fast.ops import attention

    impls = {f"mae_fast[{k}]": (lambda qkv: attention(qkv, backend="cuda")) for k in kernels}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        if hasattr(SDPBackend, name):
            impls["sdpa_" + name.split("_")[0].lower()] = _timm_sdpa(getattr(SDPBackend, name))
    try:
        from flash_attn import flash_attn_qkvpacked_func

        impls["flash_attn_qkvpacked"] = lambda qkv: flash_attn_qkvpacked_func(qkv).flatten(2)
    except Exception:  # not installed, or built for another torch
        pass
    return impls


def bench_ms(fn, grad_to_none=None):
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))
    except ImportError:
        pass
    for _ in range(5):
        fn()
    times = []
    for _ in range(50):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def run(batch: int, dtype: torch.dtype, kernels=DEFAULT_KERNELS) -> dict:
    impls = implementations(kernels)
    elem = torch.finfo(dtype).bits // 8
    rows = []
    for shape_name, N, H, D in SHAPES:
        B = batch
        torch.manual_seed(0)
        qkv = torch.randn(B, N, 3 * H * D, device="cuda", dtype=dtype).view(B, N, 3, H, D)
        dout = torch.randn(B, N, H * D, device="cuda", dtype=dtype)
        flops_fwd = 4.0 * B * H * N * N * D
        unit = B * N * H * D * elem  # bytes of one (B, N, H*D) tensor
        bytes_fwd = 4 * unit  # qkv read + out written
        bytes_fb = bytes_fwd + 9 * unit  # + qkv, out, dout read, dqkv written
        for impl_name, fn in impls.items():
            with kernels_env(_family(impl_name)):
                _bench_impl(rows, shape_name, impl_name, fn, qkv, dout, B, N, H, D, flops_fwd, bytes_fwd, bytes_fb)
    # Ratio of the best peer's time to ours per (shape, mode), for each of our kernel families.
    ratios, choice = {}, {}
    for shape_name, *_ in SHAPES:
        for mode in ("fwd", "fwd+bwd"):
            here = [r for r in rows if r["shape"] == shape_name and r.get("mode") == mode]
            ours = [r for r in here if _ours(r["impl"])]
            peers = [r for r in here if not _ours(r["impl"])]
            if ours:
                choice[f"{shape_name} {mode}"] = min(ours, key=lambda r: r["ms"])["impl"]
            if not peers:
                continue
            best = min(peers, key=lambda r: r["ms"])
            for r in ours:
                key = f"{shape_name} {mode}" + (f" {_family(r['impl'])}" if _family(r["impl"]) else "")
                ratios[key] = {"best_peer": best["impl"], "best_peer_ms": best["ms"], "ours": r["impl"],
                               "ours_ms": r["ms"], "ratio": best["ms"] / r["ms"]}
    return {"rows": rows, "ratios": ratios, "kernel_choice": choice}


def _bench_impl(rows, shape_name, impl_name, fn, qkv, dout, B, N, H, D, flops_fwd, bytes_fwd, bytes_fb):
    """Times one implementation at one shape (fwd, fwd+bwd); appends its rows."""
    try:
        with torch.no_grad():
            out = fn(qkv)
        torch.cuda.synchronize()
    except Exception as e:
        rows.append({"shape": shape_name, "impl": impl_name, "skipped": f"{type(e).__name__}: {e}"[:200]})
        return
    err = None
    if _ours(impl_name):
        ref_out = _timm_sdpa_default(qkv)
        err = (out.float() - ref_out.float()).abs().max().item()
    x = qkv.detach().clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return fn(qkv)

    def fwd_bwd():
        fn(x).backward(dout)

    try:
        ms_fwd = bench_ms(fwd)
        ms_fb = bench_ms(fwd_bwd, grad_to_none=[x])
    except Exception as e:
        rows.append({"shape": shape_name, "impl": impl_name, "skipped": f"{type(e).__name__}: {e}"[:200]})
        return
    for mode, ms, flops, nbytes in (("fwd", ms_fwd, flops_fwd, bytes_fwd),
                                     ("fwd+bwd", ms_fb, 2.5 * flops_fwd, bytes_fb)):
        row = {"shape": shape_name, "B": B, "N": N, "H": H, "D": D, "impl": impl_name, "mode": mode,
               "ms": ms, "tflops": flops / ms / 1e9, "gbps": nbytes / ms / 1e6}
        if err is not None:
            row["max_abs_err_vs_sdpa"] = err
        rows.append(row)
    del x
    torch.cuda.empty_cache()


def _timm_sdpa_default(qkv):
    B, N, _, H, D = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)


def print_table(result: dict) -> None:
    print(f"{'shape':<14}{'mode':<9}{'impl':<22}{'ms':>9}{'TFLOP/s':>9}{'GB/s':>8}")
    for r in result["rows"]:
        if "skipped" in r:
            print(f"{r['shape']:<14}{'':<9}{r['impl']:<22}  skipped: {r['skipped'][:60]}")
            continue
        print(f"{r['shape']:<14}{r['mode']:<9}{r['impl']:<22}{r['ms']:>9.4f}{r['tflops']:>9.1f}{r['gbps']:>8.0f}")
    print()
    print(f"{'shape / mode / ours':<30}{'best peer':<22}{'peer ms':>9}{'ours ms':>9}{'ratio':>7}")
    for key, r in result["ratios"].items():
        print(f"{key:<30}{r['best_peer']:<22}{r['best_peer_ms']:>9.4f}{r['ours_ms']:>9.4f}{r['ratio']:>7.2f}")
    if result.get("kernel_choice"):
        print()
        print("faster kernel family per shape / mode: "
              + ", ".join(f"{k}: {v}" for k, v in result["kernel_choice"].items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--kernels", default=",".join(DEFAULT_KERNELS),
                        help=f"comma-separated {KERNELS_ENV} values to time ours with, of {', '.join(KERNEL_FAMILIES)}")
    args = parser.parse_args(argv)
    kernels = tuple(k.strip() for k in args.kernels.split(",") if k.strip())
    bad = [k for k in kernels if k not in KERNEL_FAMILIES]
    if bad or not kernels:
        parser.error(f"--kernels: {bad or 'none'} not in {KERNEL_FAMILIES}")
    if not torch.cuda.is_available():
        print("no CUDA: skipped")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"skipped": "no CUDA"}, indent=1))
        return 0
    from mae_fast import ops

    t0 = time.perf_counter()
    info = ops.extension_info()
    print(f"extension: {info} (loaded in {time.perf_counter() - t0:.1f} s)")
    result = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "batch": args.batch,
        "extension": info,
        "kernels": list(kernels),
    }
    result.update(run(args.batch, DTYPES[args.dtype], kernels))
    print(f"card: {result['card']}, torch {result['torch']}, {args.dtype}, batch {args.batch}")
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
