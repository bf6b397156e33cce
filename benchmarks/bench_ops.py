"""Microbenchmark of the fused ops: the glue (embedding, un-shuffle, patch MSE) and the block ops
(add_layer_norm, bias_gelu at the encoder's and the decoder's shapes), each forward and
forward+backward at MAE shapes (ViT-B/16, ViT-L/16, ViT-H/14, batch 256, mask ratio 0.75) in bf16,
Triton vs eager torch.

    python benchmarks/bench_ops.py [--json OUT.json] [--batch 256] [--models B L H]

Each row is timed twice (``triton.testing.do_bench``: CUDA events, median of many runs, L2
flushed before each):

- ``call ms``: the Python call as a user makes it (argument checks, dispatch, autograd, launches).
  These ops take tens of microseconds on the GPU, so this is mostly host time: in a training step
  the host runs ahead of the GPU and hides it.
- ``gpu ms``: the same call captured once in a CUDA graph and replayed: only the kernels' time.
  GB/s and the fraction of copy bandwidth are computed from it.

GB/s counts the bytes the op MUST move (each tensor once: the inputs it has to read, the outputs
it has to write; ``fwd+bwd`` = what the forward must move plus what the backward must move given
only the forward's inputs), against the card's device-to-device copy bandwidth measured in the
same run (bytes read + written). Speedups are over the eager torch reference timed the same way.
``--kernels`` adds each row's kernels and their GPU time (torch.profiler). Without CUDA it prints
"no CUDA: skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODELS = {  # name: (patch, img, embed D, decoder d, channels)
    "B": ("vit_b16", 16, 224, 768, 512, 3),
    "L": ("vit_l16", 16, 224, 1024, 512, 3),
    "H": ("vit_h14", 14, 224, 1280, 512, 3),
}


def copy_bandwidth(do_bench) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second."""
    n = 1 << 29  # bf16 elements: 1 GiB
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = do_bench(lambda: dst.copy_(src))
    return 2 * n * 2 / (t * 1e-3)


def graphed(fn):
    """``fn`` captured in a CUDA graph (``mae_fast.bench.capture_graph``): replaying it launches
    the same kernels with no Python in between."""
    from mae_fast.bench import capture_graph

    graph, _ = capture_graph(fn)
    return graph.replay


def kernel_times(fn, reps: int = 10) -> dict:
    """GPU time per call of each kernel ``fn`` launches (microseconds), from torch.profiler: a
    breakdown of where a row's time goes, run back to back with a warm L2 (so not comparable to
    ``gpu ms``, which flushes L2 before each run)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us and ev.count >= reps:
            out[ev.key[:80]] = round(us / reps, 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def bench_model(name, cfg, batch, do_bench, ops, dtype=torch.bfloat16, dev="cuda", kernels=False):
    tag, P, img, D, d, C = cfg
    N = batch
    h = w = img // P
    L = h * w
    K = int(L * (1 - 0.75))
    CPP = C * P * P
    e = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device=dev).manual_seed(0)

    imgs = torch.randn(N, C, img, img, device=dev, dtype=dtype, generator=g)
    noise = torch.rand(N, L, device=dev, generator=g)
    ids_shuffle = noise.argsort(1)
    ids_restore = ids_shuffle.argsort(1)
    ids_keep = ids_shuffle[:, :K].contiguous()
    ids_removed = ids_shuffle[:, K:].contiguous()
    mask = torch.ones(N, L, device=dev)
    mask.scatter_(1, ids_keep, 0.0)

    weight = (torch.randn(D, C, P, P, device=dev, generator=g) * 0.02).to(dtype).requires_grad_()
    bias = torch.randn(D, device=dev, generator=g).to(dtype).requires_grad_()
    pos = torch.randn(1, 1 + L, D, device=dev, generator=g).to(dtype)  # frozen, as in the model
    cls = torch.randn(1, 1, D, device=dev, generator=g).to(dtype).requires_grad_()
    x_dec = torch.randn(N, 1 + K, d, device=dev, generator=g).to(dtype).requires_grad_()
    mask_token = torch.randn(1, 1, d, device=dev, generator=g).to(dtype).requires_grad_()
    dpos = torch.randn(1, 1 + L, d, device=dev, generator=g).to(dtype)
    pred = torch.randn(N, L, CPP, device=dev, generator=g).to(dtype).requires_grad_()
    pred_m = torch.randn(N, L - K, CPP, device=dev, generator=g).to(dtype).requires_grad_()

    rows = []

    def gpu_time(fn):
        try:
            return do_bench(graphed(fn))
        except Exception as err:  # a path that cannot be captured: say so in the row
            print(f"  {tag}: CUDA graph capture failed ({type(err).__name__}: {err}); gpu ms left empty")
            return float("nan")

    def add(op, mode, fn_fast, fn_ref, nbytes, flops=0):
        t_fast, t_ref = do_bench(fn_fast), do_bench(fn_ref)
        g_fast, g_ref = gpu_time(fn_fast), gpu_time(fn_ref)
        row = {"model": tag, "op": op, "mode": mode, "ms": t_fast, "ms_torch": t_ref, "speedup": t_ref / t_fast,
               "gpu_ms": g_fast, "gpu_ms_torch": g_ref, "gpu_speedup": g_ref / g_fast,
               "bytes": nbytes, "GBps": nbytes / (g_fast * 1e-3) / 1e9,
               "flops": flops, "TFLOPs": flops / (g_fast * 1e-3) / 1e12}
        if kernels:
            row["kernels_us"] = kernel_times(fn_fast)
            row["kernels_us_torch"] = kernel_times(fn_ref)
        rows.append(row)

    def fwd(f):
        def run():
            with torch.no_grad():
                f()
        return run

    def fwdbwd(f, wrt):
        def run():
            out = f()
            torch.autograd.grad(out, wrt, torch.ones_like(out) if out.dim() else None)
        return run

    # ---- embed_visible_patches (model case: pos_embed frozen, imgs without grad)
    emb = lambda b: (lambda: ops.embed_visible_patches(imgs, ids_keep, weight, bias, pos, cls, backend=b))  # noqa
    b_fwd = (N * K * CPP + D * CPP + N * (1 + K) * D + (1 + L) * D) * e + N * K * 8
    b_bwd = (N * (1 + K) * D + N * K * CPP + D * CPP + D) * e + N * K * 8
    # The embedding holds a GEMM of 2*N*K*CPP*D flops (another for d weight): at ViT shapes it is
    # compute-bound as much as memory-bound, so its TFLOP/s is reported next to its GB/s.
    gemm = 2 * N * K * CPP * D
    add("embed_visible_patches", "fwd", fwd(emb("triton")), fwd(emb("torch")), b_fwd, gemm)
    add("embed_visible_patches", "fwd+bwd", fwdbwd(emb("triton"), (weight, bias, cls)),
        fwdbwd(emb("torch"), (weight, bias, cls)), b_fwd + b_bwd, 2 * gemm)
    gat = lambda b: (lambda: ops.gather_patches(imgs, ids_keep, P, backend=b))  # noqa
    add("gather_patches", "fwd", fwd(gat("triton")), fwd(gat("torch")), 2 * N * K * CPP * e + N * K * 8)

    # ---- unshuffle_mask_tokens (decoder_pos_embed frozen)
    uns = lambda b: (lambda: ops.unshuffle_mask_tokens(x_dec, ids_restore, mask_token, dpos, backend=b))  # noqa
    u_fwd = (N * (1 + K) * d + (1 + L) * d + N * (1 + L) * d) * e + N * L * 8
    u_bwd = (N * (1 + L) * d + N * (1 + K) * d + d) * e + N * L * 8
    add("unshuffle_mask_tokens", "fwd", fwd(uns("triton")), fwd(uns("torch")), u_fwd)
    add("unshuffle_mask_tokens", "fwd+bwd", fwdbwd(uns("triton"), (x_dec, mask_token)),
        fwdbwd(uns("torch"), (x_dec, mask_token)), u_fwd + u_bwd)

    # ---- patch_mse_loss, norm_pix_loss=True (full pred, and pred of the removed patches only)
    R = L - K
    for norm in (True,):
        mse = lambda b: (lambda: ops.patch_mse_loss(pred, imgs, mask, P, norm, backend=b))  # noqa
        m_fwd = 2 * N * R * CPP * e + N * L * 4
        m_bwd = 2 * N * R * CPP * e + N * L * CPP * e + N * L * 4
        add("patch_mse_loss", "fwd", fwd(mse("triton")), fwd(mse("torch")), m_fwd)
        add("patch_mse_loss", "fwd+bwd", fwdbwd(mse("triton"), (pred,)), fwdbwd(mse("torch"), (pred,)),
            m_fwd + m_bwd)
        msm = lambda b: (lambda: ops.patch_mse_loss(pred_m, imgs, mask, P, norm, pred_ids=ids_removed, backend=b))  # noqa
        mm_fwd = 2 * N * R * CPP * e + N * R * (4 + 8)
        mm_bwd = 3 * N * R * CPP * e + N * R * (4 + 8)
        add("patch_mse_loss[masked_only]", "fwd", fwd(msm("triton")), fwd(msm("torch")), mm_fwd)
        add("patch_mse_loss[masked_only]", "fwd+bwd", fwdbwd(msm("triton"), (pred_m,)),
            fwdbwd(msm("torch"), (pred_m,)), mm_fwd + mm_bwd)
    # ---- the fused block ops, at the encoder's and the decoder's shapes, in autocast's dtypes
    mlp = {768: 3072, 1024: 4096, 1280: 5120}[D]
    for where, n_rows, width, hidden in (("enc", N * (1 + K), D, mlp), ("dec", N * (1 + L), d, 4 * d)):
        bench_block_ops(where, n_rows, width, hidden, add, fwd, ops, dev, g)
    return rows


def bench_block_ops(where, n_rows, D, hidden, add, fwd, ops, dev, g):
    """add_layer_norm and bias_gelu as a block uses them under bf16 autocast (fp32 residual stream
    and parameters, bf16 Linear outputs, the norm's output in bf16), against what eager PyTorch
    runs there: the Linear adds its bias in the GEMM, then ``x + y``, ``F.layer_norm`` (fp32 out),
    the next Linear's cast to bf16, ``F.gelu``; the backward includes the Linear's bias gradient
    (a sum of the gradient over rows). Bytes per element: add_layer_norm fwd 12 (x 4, y 2 read; h 4,
    out 2 written), bwd 16 (dout 2, dh 4, h 4 read; dx 4, dy 2 written); bias_gelu fwd 4, bwd 6."""
    import torch.nn.functional as F

    bf = torch.bfloat16
    x = torch.randn(n_rows, D, device=dev, generator=g).requires_grad_()
    y = torch.randn(n_rows, D, device=dev, generator=g).to(bf).requires_grad_()
    w = torch.ones(D, device=dev).requires_grad_()
    nb, b = torch.zeros(D, device=dev).requires_grad_(), torch.zeros(D, device=dev).requires_grad_()
    u = torch.randn(n_rows, hidden, device=dev, generator=g).to(bf).requires_grad_()
    ub = torch.zeros(hidden, device=dev).requires_grad_()
    gh, go, gu = torch.randn_like(x), torch.randn_like(y), torch.randn_like(u)

    def aln_ours():
        return ops.add_layer_norm(x, y, w, nb, 1e-6, bias=b, out_dtype=bf, backend="triton")

    def aln_eager():
        h = x + y
        return h, F.layer_norm(h, (D,), w, nb, 1e-6).to(bf)

    def aln_bwd(f, with_bias_sum):
        def run():
            grads = torch.autograd.grad(f(), (x, y, w, nb) + ((b,) if not with_bias_sum else ()), (gh, go))
            if with_bias_sum:
                grads[1].sum(0, dtype=torch.float32)  # the Linear's bias gradient, in eager
        return run

    def gelu_bwd(f, with_bias_sum):
        def run():
            grads = torch.autograd.grad(f(), (u,) if with_bias_sum else (u, ub), gu)
            if with_bias_sum:
                grads[0].sum(0, dtype=torch.float32)
        return run

    E = n_rows * D
    name = f"add_layer_norm[{where}]"
    add(name, "fwd", fwd(aln_ours), fwd(aln_eager), 12 * E + 12 * D)
    add(name, "fwd+bwd", aln_bwd(aln_ours, False), aln_bwd(aln_eager, True), 28 * E + 24 * D)
    gelu_ours = lambda: ops.bias_gelu(u, ub, backend="triton")  # noqa: E731
    gelu_eager = lambda: F.gelu(u)  # noqa: E731
    H = n_rows * hidden
    name = f"bias_gelu[{where}]"
    add(name, "fwd", fwd(gelu_ours), fwd(gelu_eager), 4 * H + 4 * hidden)
    add(name, "fwd+bwd", gelu_bwd(gelu_ours, False), gelu_bwd(gelu_eager, True), 10 * H + 8 * hidden)


def print_table(rows) -> None:
    hdr = (f"{'model':8} {'op':28} {'mode':8} {'gpu ms':>7} {'torch':>7} {'speedup':>7} {'GB/s':>6} {'of copy':>7}"
           f" {'call ms':>8} {'torch':>7} {'speedup':>7} {'TFLOP/s':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['model']:8} {r['op']:28} {r['mode']:8} {r['gpu_ms']:7.3f} {r['gpu_ms_torch']:7.3f} "
              f"{r['gpu_speedup']:6.2f}x {r['GBps']:6.0f} {100 * r['copy_fraction']:6.0f}% "
              f"{r['ms']:8.3f} {r['ms_torch']:7.3f} {r['speedup']:6.2f}x" + (f" {r['TFLOPs']:8.0f}" if r["flops"] else ""))
        for key in ("kernels_us", "kernels_us_torch"):
            if key in r:
                print(f"{'':8} {key}: " + ", ".join(f"{k} {v}" for k, v in r[key].items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--kernels", action="store_true", help="list each row's kernels and their GPU time")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA: skipped")
        return 0
    import triton
    from triton.testing import do_bench as _do_bench

    from mae_fast import ops

    def do_bench(fn):
        return _do_bench(fn, warmup=25, rep=200, return_mode="median")

    torch.backends.cuda.matmul.allow_tf32 = False
    card = torch.cuda.get_device_name()
    bw = copy_bandwidth(do_bench)
    print(f"{card}: device-to-device copy {bw / 1e9:.0f} GB/s (read + write); torch {torch.__version__}, "
          f"triton {triton.__version__}; batch {args.batch}, bf16")
    rows = []
    for m in args.models:  # the JSON is rewritten after each model: a run cut short keeps what it measured
        new = bench_model(m, MODELS[m], args.batch, do_bench, ops, kernels=args.kernels)
        for r in new:
            r["copy_fraction"] = r["GBps"] * 1e9 / bw
        rows += new
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": card, "torch": torch.__version__, "triton": triton.__version__,
                           "dtype": "bfloat16", "batch": args.batch, "copy_GBps": bw / 1e9, "rows": rows}, f, indent=1)
    print_table(rows)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
