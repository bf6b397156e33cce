"""The fused packed-QKV attention op (mae_fast.ops.attention, csrc/).

CPU: the extension's C++ twin (same blocked online-softmax algorithm as the CUDA kernels) against
a float64 reference, forward and backward, plus the custom-op machinery (opcheck, autograd,
torch.compile, autocast, errors). GPU (marked): the CUDA kernels against a float64 reference with
flash-attention's rule (error <= 2x PyTorch's own error in the same dtype, plus a small floor).
"""
import math
import os

import pytest
import torch

from conftest import FLASH_RULE_FLOOR, HAS_CUDA, assert_close, tol  # noqa: F401

from mae_fast import ops
from mae_fast.ops import BackendUnavailableError, attention, attention_reference
from mae_fast.ops import _extension as E
from mae_fast.ops import qkv_attention as A

HEAD_DIMS = (32, 64, 80, 128)
CPU_NS = (1, 7, 50, 65, 129, 197)
GPU_NS = (1, 7, 50, 65, 129, 197, 257, 513)


@pytest.fixture(scope="session")
def ext():
    """Loads (JIT-builds once per machine, ~1 min on 2 cores) the extension."""
    reason = E.load_extension()
    if reason is not None and os.environ.get(E.NO_JIT_ENV, "") not in ("", "0"):
        pytest.skip(reason)
    assert reason is None, reason
    return ops.extension_info()


def make_qkv(B, N, H, D, dtype, device="cpu", requires_grad=True):
    """A qkv Linear's (B, N, 3*H*D) output viewed as (B, N, 3, H, D), values like a real layer's."""
    x = torch.randn(B, N, 3 * H * D, device=device, dtype=torch.float32)
    qkv = x.to(dtype).view(B, N, 3, H, D)
    return qkv.requires_grad_(requires_grad)


def grads_of(fn, qkv, dout):
    qkv = qkv.detach().requires_grad_(True)
    out = fn(qkv)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    return out.detach(), dqkv


def ext_fn(qkv):
    return attention(qkv, backend="cuda")


# ---------------------------------------------------------------------------------------------
# CPU twin, against float64.

@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("N", CPU_NS)
def test_cpu_twin_forward_backward_fp32(ext, seed, N, D):
    B, H = 2, 2
    qkv = make_qkv(B, N, H, D, torch.float32)
    dout = torch.randn(B, N, H * D)
    out, dqkv = grads_of(ext_fn, qkv, dout)
    ref_out, ref_dqkv = grads_of(attention_reference, qkv.double(), dout.double())
    assert out.shape == (B, N, H * D) and out.is_contiguous()
    assert_close(out, ref_out, torch.float32)
    assert_close(dqkv, ref_dqkv, torch.float32)

    # lse is the natural-log logsumexp of the scaled scores.
    _, lse = torch.ops.mae_fast.attention_fwd(qkv.detach())
    q, k, _ = qkv.detach().double().permute(2, 0, 3, 1, 4).unbind(0)
    ref_lse = torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, N)
    assert_close(lse, ref_lse, torch.float32)


def _max_err(a, ref):
    return (a.double() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("N", (7, 65, 197))
def test_cpu_twin_low_precision(ext, seed, dtype, N, D):
    """fp32 math inside, so the twin is at least as accurate as torch in the same dtype."""
    B, H = 1, 2
    qkv = make_qkv(B, N, H, D, dtype)
    dout = torch.randn(B, N, H * D).to(dtype)
    out, dqkv = grads_of(ext_fn, qkv, dout)
    assert out.dtype == dtype and dqkv.dtype == dtype
    ref_out, ref_dqkv = grads_of(attention_reference, qkv.double(), dout.double())
    pt_out, pt_dqkv = grads_of(attention_reference, qkv, dout)
    floor = FLASH_RULE_FLOOR[dtype]
    assert _max_err(out, ref_out) <= 2 * _max_err(pt_out, ref_out) + floor
    for i, name in enumerate("qkv"):
        ours, ref, pt = dqkv[:, :, i], ref_dqkv[:, :, i], pt_dqkv[:, :, i]
        assert _max_err(ours, ref) <= 2 * _max_err(pt, ref) + floor, f"d{name}"


def test_cpu_twin_odd_head_dim_and_deterministic(ext, seed):
    qkv = make_qkv(2, 33, 3, 24, torch.float32)
    dout = torch.randn(2, 33, 72)
    out, dqkv = grads_of(ext_fn, qkv, dout)
    ref_out, ref_dqkv = grads_of(attention_reference, qkv.double(), dout.double())
    assert_close(out, ref_out, torch.float32)
    assert_close(dqkv, ref_dqkv, torch.float32)
    _, dqkv2 = grads_of(ext_fn, qkv, dout)
    assert torch.equal(dqkv, dqkv2)


def test_strided_view_of_a_wider_linear_output(ext, seed):
    """qkv as a view of a wider buffer (row stride != 3*H*D): handled without a copy."""
    B, N, H, D = 2, 50, 2, 32
    wide = torch.randn(B, N, 3 * H * D + 16)
    qkv = wide[..., : 3 * H * D].view(B, N, 3, H, D)
    assert not qkv.is_contiguous()
    dout = torch.randn(B, N, H * D)
    out, dqkv = grads_of(ext_fn, qkv, dout)
    ref_out, ref_dqkv = grads_of(attention_reference, qkv.double(), dout.double())
    assert_close(out, ref_out, torch.float32)
    assert_close(dqkv, ref_dqkv, torch.float32)


def test_strided_batch_and_expanded_grad(ext, seed):
    """Every other batch entry, and the stride-0 gradient of out.sum()."""
    qkv = make_qkv(4, 9, 2, 32, torch.float32, requires_grad=False)[::2].requires_grad_(True)
    out = ext_fn(qkv)
    out.sum().backward()
    ref = qkv.detach().double().requires_grad_(True)
    attention_reference(ref).sum().backward()
    assert_close(out, attention_reference(qkv.detach().double()), torch.float32)
    assert_close(qkv.grad, ref.grad, torch.float32)


def test_innermost_stride_rejected(ext):
    qkv = torch.randn(2, 5, 3, 2, 64 * 2)[..., ::2]
    with pytest.raises(ValueError, match="innermost"):
        ext_fn(qkv)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: torch.randn(2, 5, 3, 64), ValueError, r"\(B, N, 3, H, D\)"),
        (lambda: torch.randn(2, 5, 2, 2, 64), ValueError, r"\(B, N, 3, H, D\)"),
        (lambda: torch.ones(2, 5, 3, 2, 64, dtype=torch.int32), TypeError, "floating"),
        (lambda: torch.randn(2, 5, 3, 2, 64, dtype=torch.float64), TypeError, "float16, bfloat16 or float32"),
    ],
)
def test_bad_inputs(ext, make, exc, match):
    with pytest.raises(exc, match=match):
        ext_fn(make())


@pytest.mark.skipif(torch.cuda.is_available(), reason=(
    "open bug: on the H200 machine (torch 2.11, cu130) errors thrown inside the CUDA build of the "
    "extension whose messages streamed a shape crashed the process; the messages no longer do, "
    "unverified on a GPU; the public attention() raises these in Python first"))
def test_op_level_errors(ext):
    with pytest.raises(ValueError, match="qkv must have shape"):
        torch.ops.mae_fast.attention_fwd(torch.randn(2, 5, 4, 2, 8))
    qkv = torch.randn(1, 5, 3, 2, 8)
    out, lse = torch.ops.mae_fast.attention_fwd(qkv)
    with pytest.raises(ValueError, match="dout must have shape"):
        torch.ops.mae_fast.attention_bwd(out[:, :4], qkv, out, lse)
    with pytest.raises(TypeError, match="lse must be float32"):
        torch.ops.mae_fast.attention_bwd(out, qkv, out, lse.double())


def test_empty_inputs(ext):
    for shape in [(0, 5, 3, 2, 8), (2, 0, 3, 2, 8), (2, 5, 3, 0, 8)]:
        qkv = torch.randn(shape, requires_grad=True)
        out = ext_fn(qkv)
        assert out.shape == (shape[0], shape[1], shape[3] * shape[4])
        out.sum().backward()
        assert qkv.grad.shape == qkv.shape


def test_opcheck(ext, seed):
    qkv = make_qkv(2, 11, 2, 16, torch.float32)
    torch.library.opcheck(torch.ops.mae_fast.attention_fwd.default, (qkv,))
    out, lse = torch.ops.mae_fast.attention_fwd(qkv.detach())
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.mae_fast.attention_bwd.default, (dout, qkv.detach(), out, lse))


def test_torch_compile_fullgraph(ext, seed):
    torch._dynamo.reset()
    qkv = make_qkv(2, 13, 2, 32, torch.float32)
    compiled = torch.compile(ext_fn, fullgraph=True)
    dout = torch.randn(2, 13, 64)
    out, dqkv = grads_of(compiled, qkv, dout)
    ref_out, ref_dqkv = grads_of(ext_fn, qkv, dout)
    assert_close(out, ref_out, torch.float32)
    assert_close(dqkv, ref_dqkv, torch.float32)


def test_autocast_runs_in_autocast_dtype(ext, seed):
    qkv = make_qkv(1, 9, 2, 32, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ext_fn(qkv)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert qkv.grad.dtype == torch.float32


def test_status_helpers(ext):
    assert ops.extension_status().startswith("loaded")
    assert ops.extension_info()["reason"] is None


def test_backend_selection(ext):
    cpu = torch.device("cpu")
    qkv = make_qkv(1, 4, 2, 8, torch.float32, requires_grad=False)
    assert attention_reference is A.attention_op.select((qkv,), "auto")[1]  # auto: the reference on CPU
    assert A.attention_op.select((qkv,), "cuda")[0] == "cuda"  # explicit: the CPU twin
    reason = E.why_not_extension(torch.device("cuda"))
    if ext["cuda"]:
        assert reason is None
    else:
        assert "without CUDA kernels" in reason
    assert "meta" in E.why_not_extension(torch.device("meta"))
    with pytest.raises(BackendUnavailableError, match="cannot run op"):
        A.attention_op.select((qkv.to("meta"),), "cuda")


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA kernels.

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("N", GPU_NS)
def test_gpu_against_float64(ext, seed, dtype, D, N):
    assert ext["cuda"], "the extension has no CUDA kernels"
    B, H = 2, 3
    qkv = make_qkv(B, N, H, D, dtype, device="cuda")
    dout = torch.randn(B, N, H * D, device="cuda").to(dtype)
    out, dqkv = grads_of(ext_fn, qkv, dout)
    ref_out, ref_dqkv = grads_of(attention_reference, qkv.double(), dout.double())
    pt_out, pt_dqkv = grads_of(attention_reference, qkv, dout)
    floor = FLASH_RULE_FLOOR[dtype]
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    err, pt_err = _max_err(out, ref_out), _max_err(pt_out, ref_out)
    assert err <= 2 * pt_err + floor, f"out: {err} vs torch {pt_err}"
    for i, name in enumerate("qkv"):
        err, pt_err = _max_err(dqkv[:, :, i], ref_dqkv[:, :, i]), _max_err(pt_dqkv[:, :, i], ref_dqkv[:, :, i])
        assert err <= 2 * pt_err + floor, f"d{name}: {err} vs torch {pt_err}"


@pytest.mark.gpu
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_gpu_backward_deterministic(ext, seed, D):
    qkv = make_qkv(4, 197, 4, D, torch.bfloat16, device="cuda")
    dout = torch.randn(4, 197, 4 * D, device="cuda").to(torch.bfloat16)
    out1, d1 = grads_of(ext_fn, qkv, dout)
    out2, d2 = grads_of(ext_fn, qkv, dout)
    assert torch.equal(out1, out2) and torch.equal(d1, d2)


@pytest.mark.gpu
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_gpu_outputs_fully_written(ext, seed, D):
    """Poison the caching allocator's blocks with NaN; every output element must be overwritten."""
    B, N, H = 3, 65, 2
    qkv = make_qkv(B, N, H, D, torch.float16, device="cuda", requires_grad=False)
    dout = torch.randn(B, N, H * D, device="cuda").to(torch.float16)
    for _ in range(2):  # the second round reuses the blocks the first one freed
        poison = [torch.full((B, N, H * D), float("nan"), device="cuda", dtype=torch.float16),
                  torch.full((B, H, N), float("nan"), device="cuda"),
                  torch.full((B, N, 3, H, D), float("nan"), device="cuda", dtype=torch.float16),
                  torch.full((B, H, N), float("nan"), device="cuda")]
        del poison
        out, lse = torch.ops.mae_fast.attention_fwd(qkv)
        dqkv = torch.ops.mae_fast.attention_bwd(dout, qkv, out, lse)
        torch.cuda.synchronize()
        assert not out.isnan().any() and not lse.isnan().any() and not dqkv.isnan().any()


@pytest.mark.gpu
def test_gpu_strides(ext, seed):
    B, N, H, D = 2, 50, 4, 64
    # A wider Linear output (aligned row stride): used in place.
    wide = torch.randn(B, N, 3 * H * D + 64, device="cuda").half()
    qkv = wide[..., : 3 * H * D].view(B, N, 3, H, D)
    assert_close(ext_fn(qkv), attention_reference(qkv.double()), torch.float16)
    # An odd offset (16-byte misaligned): copied, still right.
    odd = torch.randn(B * N * 3 * H * D + 1, device="cuda").half()[1:].view(B, N, 3, H, D)
    assert_close(ext_fn(odd), attention_reference(odd.double()), torch.float16)
    # Head-dim stride 2: rejected.
    with pytest.raises(ValueError, match="innermost"):
        ext_fn(torch.randn(B, N, 3, H, 2 * D, device="cuda").half()[..., ::2])
    # Unsupported head dim / dtype: explicit cuda errors, auto falls back to the reference.
    bad = torch.randn(B, N, 3, H, 48, device="cuda").half()
    with pytest.raises(ValueError, match="32, 64, 80, 128"):
        ext_fn(bad)
    assert_close(attention(bad, backend="auto"), attention_reference(bad.double()), torch.float16)
    f32 = torch.randn(B, N, 3, H, D, device="cuda")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        ext_fn(f32)
    assert_close(attention(f32, backend="auto"), attention_reference(f32.double()), torch.float32)


@pytest.mark.gpu
def test_gpu_auto_uses_extension_and_compiles(ext, seed):
    assert A.attention_op.select((make_qkv(1, 4, 2, 64, torch.bfloat16, "cuda"),), "auto")[0] == "cuda"
    torch._dynamo.reset()
    qkv = make_qkv(2, 50, 4, 64, torch.float32, device="cuda")
    dout = torch.randn(2, 50, 256, device="cuda")

    def f(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return attention(x, backend="cuda").float()

    out, dqkv = grads_of(torch.compile(f, fullgraph=True), qkv, dout)
    ref_out, ref_dqkv = grads_of(attention_reference, qkv.double(), dout.double())
    assert_close(out, ref_out, torch.bfloat16)
    assert_close(dqkv, ref_dqkv, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# GPU: the short-sequence kernels (csrc/attention/short_kernels.cuh), chosen by the extension's
# MAE_FAST_ATTENTION_KERNELS=short (read at each call); the same checks as the default kernels.
# N = 300 is past what they cover (the tiled kernels run), at D >= 64 the backward covers N <= 80.

KERNELS_ENV = "MAE_FAST_ATTENTION_KERNELS"
SHORT_NS = (1, 7, 50, 65, 196, 197, 257, 300)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("N", SHORT_NS)
def test_gpu_short_kernels_against_float64(ext, seed, monkeypatch, dtype, D, N):
    monkeypatch.setenv(KERNELS_ENV, "short")
    test_gpu_against_float64(ext, seed, dtype, D, N)


@pytest.mark.gpu
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("N", (50, 65, 197, 257))
def test_gpu_short_kernels_deterministic(ext, seed, monkeypatch, D, N):
    monkeypatch.setenv(KERNELS_ENV, "short")
    qkv = make_qkv(4, N, 4, D, torch.bfloat16, device="cuda")
    dout = torch.randn(4, N, 4 * D, device="cuda").to(torch.bfloat16)
    out1, d1 = grads_of(ext_fn, qkv, dout)
    out2, d2 = grads_of(ext_fn, qkv, dout)
    assert torch.equal(out1, out2) and torch.equal(d1, d2)


@pytest.mark.gpu
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_gpu_short_kernels_outputs_fully_written(ext, seed, monkeypatch, D):
    monkeypatch.setenv(KERNELS_ENV, "short")
    test_gpu_outputs_fully_written(ext, seed, D)


@pytest.mark.gpu
def test_gpu_short_kernels_strides(ext, seed, monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "short")
    test_gpu_strides(ext, seed)
    # A strided decoder-shaped view (the dQ variant that recomputes S and dP) against float64.
    B, N, H, D = 2, 197, 2, 32
    wide = torch.randn(B, N, 3 * H * D + 32, device="cuda").bfloat16()
    qkv = wide[..., : 3 * H * D].view(B, N, 3, H, D).requires_grad_(True)
    dout = torch.randn(B, N, H * D, device="cuda").bfloat16()
    out, dqkv = grads_of(ext_fn, qkv, dout)
    ref_out, ref_dqkv = grads_of(attention_reference, qkv.double(), dout.double())
    assert_close(out, ref_out, torch.bfloat16)
    assert_close(dqkv, ref_dqkv, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("N, D, fwd_short, bwd_short", [(65, 80, True, True), (197, 32, True, True),
                                                        (197, 64, True, False), (300, 32, False, False)])
def test_gpu_kernel_choice_reaches_the_kernels(ext, seed, monkeypatch, N, D, fwd_short, bwd_short):
    """The kernels that run (by name, from the profiler) follow MAE_FAST_ATTENTION_KERNELS."""
    qkv = make_qkv(2, N, 2, D, torch.bfloat16, device="cuda")
    for choice in ("auto", "tiled", "short"):
        monkeypatch.setenv(KERNELS_ENV, choice)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ext_fn(qkv).float().sum().backward()
            torch.cuda.synchronize()
        names = " ".join(e.name for e in prof.events())
        short = choice == "short"
        assert ("attention_fwd_short_kernel" in names) == (short and fwd_short), (choice, names[:500])
        assert ("attention_bwd_short_kernel" in names) == (short and bwd_short), (choice, names[:500])
        assert ("attention_fwd_kernel" in names) == (not (short and fwd_short)), (choice, names[:500])
