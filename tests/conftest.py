"""Test set-up shared by every test file.

Triton runs on CPU tensors only under its interpreter, which must be switched on before triton is
first imported: so this file sets it before anything else when no GPU is present.
"""
import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _round_bf16_casts_to_nearest():
    """The interpreter casts fp32 to bf16 by truncation (triton 3.6 and 3.9), where a GPU rounds
    to nearest even (``cvt.rn.bf16.f32``), as torch does: every bf16 a kernel wrote here was up to
    one unit low in magnitude, always the same way, and the bf16 checks failed by chance (3-7% of
    seeds). So the emulation rounds as the GPU does; tests/test_triton_rounding.py fails if this
    stops applying."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    truncating = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return truncating(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # ties to even
        rounded = np.where(np.isnan(src.data).reshape(rounded.shape), np.uint16(0x7FC0), rounded)
        data = rounded.reshape(np.shape(src.data)).view(interpreter._get_np_dtype(dst_type.scalar))
        return interpreter.TensorHandle(data, dst_type.scalar)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


if os.environ.get("TRITON_INTERPRET") == "1":
    _round_bf16_casts_to_nearest()

HAS_CUDA = torch.cuda.is_available()

# Tolerances per dtype, stated once: (rtol, atol) for comparing a kernel with its torch reference
# evaluated in the same dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}

# Whole-model comparisons against the float64 spec (loss, pred and every gradient, through all the
# layers): a float64 model meets it to 1e-10 absolute as well; fp32 as the elementwise rule.
MODEL_TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
}

# flash-attention's rule for paths that sum in another order than the reference: the error
# against float64 is at most 2x PyTorch's own error in the same dtype, plus a floor: absolute for
# the attention kernels' fp16/bf16 outputs; relative (times the exact value's max or norm, plus
# NORM_FLOOR) for whole fp32 training steps.
FLASH_RULE_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}
NORM_FLOOR = 1e-9


def tol(dtype: torch.dtype, table: dict = TOLERANCES) -> dict:
    rtol, atol = table[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol(dtype), msg=msg or None)


def assert_close_in_norm(actual, expected, dtype=None, msg=""):
    """The same per-dtype tolerances, applied to the whole tensor's norm: ``||a - e|| <=
    rtol * ||e|| + atol * sqrt(n)`` (what the elementwise rule implies for the norm). For sums over
    many rows (a weight gradient), whose elements carry rounding in proportion to the summands,
    not to the result: elements that cancel to near zero keep an absolute error of that size."""
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    a, e = actual.double(), expected.double()
    err = torch.linalg.vector_norm(a - e).item()
    bound = rtol * torch.linalg.vector_norm(e).item() + atol * e.numel() ** 0.5
    assert err <= bound, f"{msg} ||actual - expected|| = {err:.3g} > {bound:.3g}"


def _upcast(a, dtype):
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return a.detach().to(dtype).requires_grad_(a.requires_grad)
    return a


def check_against_reference(op, args, dtype, *, kwargs=None, ref_dtype=torch.float32, out_dtype=None,
                            grad_out=None, in_norm=(), reference=None):
    """An op's kernels (``backend="triton"``) against its torch reference run on the same values
    upcast to ``ref_dtype``, forward and backward: each output (of dtype ``out_dtype``, default
    ``dtype``; a tuple for an op with several outputs) and the gradient of every input that
    requires grad (of that input's dtype), each within ``dtype``'s tolerances; the gradients of the
    inputs at the positions ``in_norm`` (sums over many rows) in norm. ``grad_out`` is the output's
    gradient (default: a random one in the output's dtype; none for a scalar output). Non-float
    arguments (ids, bool masks, dtypes) are shared. ``reference`` replaces the op's torch backend
    where the upcast would skip a rounding that the op's definition makes in the inputs' dtype."""
    kwargs = kwargs or {}
    outs = _as_tuple(op(*args, **kwargs, backend="triton"))
    ref_args = [_upcast(a, ref_dtype) for a in args]
    refs = _as_tuple(reference(*ref_args, **kwargs) if reference else op(*ref_args, **kwargs, backend="torch"))
    dtypes = _as_tuple(out_dtype or dtype)
    dtypes = dtypes * len(outs) if len(dtypes) == 1 else dtypes
    for i, (out, ref, dt) in enumerate(zip(outs, refs, dtypes)):
        assert out.dtype == dt and out.shape == ref.shape, f"output {i}: {out.dtype} {tuple(out.shape)}"
        assert_close(out, ref, dtype, msg=f"output {i}")
    picked = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    if len(outs) == 1 and outs[0].dim() == 0 and grad_out is None:
        gs, gs_ref = None, None
    else:
        gs = _as_tuple(grad_out) if grad_out is not None else tuple(
            torch.randn(o.shape, device=o.device).to(o.dtype) for o in outs)
        gs_ref = tuple(g.to(ref_dtype) for g in gs)
    grads = torch.autograd.grad(outs, [args[i] for i in picked], gs)
    grads_ref = torch.autograd.grad(refs, [ref_args[i] for i in picked], gs_ref)
    for i, a, e in zip(picked, grads, grads_ref):
        assert a.dtype == args[i].dtype, f"the gradient of argument {i} is {a.dtype}, not {args[i].dtype}"
        (assert_close_in_norm if i in in_norm else assert_close)(a, e, dtype, msg=f"gradient of argument {i}")


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: slow on CPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def seed():
    """A fresh seed per test, printed on failure so a failing draw can be replayed."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s


# ---------------------------------------------------------------------------- training runs
def torchrun(module: str, *argv, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m module argv`` on ``nproc`` gloo processes (torchrun, one thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *[str(a) for a in argv]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def read_metrics(folder, kind: str | None = None) -> list[dict]:
    """The records of a run's metrics.jsonl (only those of ``kind``, when given)."""
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if kind is None or r.get("kind") == kind]
