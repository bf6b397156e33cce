"""Registers, spills and shared memory of the Triton kernels at sm_90a, without a GPU.

    python benchmarks/triton_resources.py [--ops residual_norm gelu ...] [--json OUT.json]

Each kernel is compiled (Triton's own ptxas) for the variant the models launch (bf16 activations
under autocast, fp32 parameters, the tile the host launcher picks at that width) and its cubin
read with ``cuobjdump --dump-resource-usage`` (shipped in the triton wheel). ``LOCAL`` > 0 means
spilled registers. Run in a process without ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _residual_norm(m):
    for D in (768, 1024, 1280, 512):
        ROWS, BLOCK_D, warps = m._tile(D)
        k = {"ROWS": ROWS, "BLOCK_D": BLOCK_D}
        for scale in (False, True):  # pretraining; fine-tuning with stochastic depth
            tag = f"D={D}" + (" drop-path" if scale else "")
            yield (f"_add_ln_fwd_kernel {tag}", m._add_ln_fwd_kernel,
                   {"x_ptr": "*fp32", "y_ptr": "*bf16", "bias_ptr": "*fp32", "scale_ptr": "*fp32", "w_ptr": "*fp32",
                    "nb_ptr": "*fp32", "h_ptr": "*fp32", "out_ptr": "*bf16", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                    "eps": "fp32"}, {**k, "HAS_Y": True, "HAS_BIAS": True, "HAS_SCALE": scale}, warps)
            yield (f"_add_ln_bwd_kernel {tag}", m._add_ln_bwd_kernel,
                   {"dout_ptr": "*bf16", "dh_ptr": "*fp32", "h_ptr": "*fp32", "w_ptr": "*fp32", "mean_ptr": "*fp32",
                    "rstd_ptr": "*fp32", "scale_ptr": "*fp32", "dx_ptr": "*fp32", "dy_ptr": "*bf16", "part_ptr": "*fp32"},
                   {**k, "HAS_DH": True, "HAS_SCALE": scale, "WRITE_DY": True}, warps)


def _gelu(m):
    for F in (3072, 4096, 5120, 2048):
        ROWS, BLOCK_F = m._tile(F)
        k = {"ROWS": ROWS, "BLOCK_F": BLOCK_F}
        yield (f"_bias_gelu_fwd_kernel F={F}", m._bias_gelu_fwd_kernel,
               {"x_ptr": "*bf16", "b_ptr": "*fp32", "out_ptr": "*bf16"}, k, 8)
        yield (f"_bias_gelu_bwd_kernel F={F}", m._bias_gelu_bwd_kernel,
               {"g_ptr": "*bf16", "x_ptr": "*bf16", "b_ptr": "*fp32", "dx_ptr": "*bf16", "part_ptr": "*fp32"}, k, 8)


def _unshuffle(m):
    from mae_fast.ops._triton import row_block, rows_block

    ROWS, BLOCK_D, warps = rows_block(512)
    yield ("_unshuffle_fwd_kernel d=512", m._unshuffle_fwd_kernel,
           {"x_ptr": "*bf16", "ids_ptr": "*i64", "mt_ptr": "*fp32", "pos_ptr": "*fp32", "out_ptr": "*bf16"},
           {"ROWS": ROWS, "BLOCK_D": BLOCK_D}, warps)
    BLOCK_D, _ = row_block(512, cap=m._BWD_TILE // m._BWD_CHUNK)
    yield ("_unshuffle_bwd_kernel d=512", m._unshuffle_bwd_kernel,
           {"g_ptr": "*bf16", "ids_ptr": "*i64", "dx_ptr": "*bf16", "part_ptr": "*fp32"},
           {"CHUNK": m._BWD_CHUNK, "BLOCK_D": BLOCK_D}, 8)


KERNELS = {"residual_norm": _residual_norm, "gelu": _gelu, "unshuffle": _unshuffle}


def resource_usage(cubin: bytes) -> dict:
    """``{"regs", "stack", "shared", "local"}`` of the one kernel in ``cubin``."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"regs": int(found["REG"]), "stack": int(found["STACK"]), "shared": int(found["SHARED"]),
            "local": int(found["LOCAL"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args(argv)
    import importlib

    from mae_fast.ops._triton import compile_for_cuda

    rows = []
    print(f"{'kernel':44} {'warps':>5} {'regs':>5} {'spill B':>7} {'shared B':>8}")
    for op in args.ops:
        mod = importlib.import_module(f"mae_fast.ops.{op}")
        for name, kernel, signature, constexprs, warps in KERNELS[op](mod):
            compiled = compile_for_cuda(kernel, signature, constexprs, num_warps=warps)
            use = resource_usage(compiled.asm["cubin"])
            rows.append({"op": op, "kernel": name, "warps": warps, **use})
            print(f"{name:44} {warps:5d} {use['regs']:5d} {use['local']:7d} {use['shared']:8d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": "sm_90a", "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
