"""Residual add + LayerNorm: the Triton kernels against the torch reference, forward and backward.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest): fp32 and fp16, few rows.
"""
import pytest
import torch

from conftest import assert_close, check_against_reference
from mae_fast import ops
from mae_fast.ops import residual_norm as aln
from mae_fast.ops._triton import why_not_triton
from triton_compile import sm90_compile_test

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(why_not_triton(torch.device(DEV)) is not None,
                                reason=f"triton unusable: {why_not_triton(torch.device(DEV))}")

# every model width (ViT-B/L/H, the decoder), a non-power of two, one column
WIDTHS = (768, 1024, 1280, 512, 33, 1)


def make_inputs(shape, dtype, *, y_dtype=None, param_dtype=torch.float32, bias=True, device=DEV, noncontig=False):
    D = shape[-1]
    if noncontig:  # x transposed in memory, y a strided slice, weight a strided view
        x = torch.randn(*reversed(shape), device=device).to(dtype).permute(*reversed(range(len(shape))))
        y = torch.randn(*shape[:-1], 2 * D, device=device).to(y_dtype or dtype)[..., ::2]
        w = (1 + 0.1 * torch.randn(2 * D, device=device)).to(param_dtype)[::2]
        assert not (x.is_contiguous() or y.is_contiguous() or w.is_contiguous()) or D == 1
    else:
        x = torch.randn(shape, device=device).to(dtype)
        y = torch.randn(shape, device=device).to(y_dtype or dtype)
        w = (1 + 0.1 * torch.randn(D, device=device)).to(param_dtype)
    nb = (0.1 * torch.randn(D, device=device)).to(param_dtype)
    b = (0.1 * torch.randn(D, device=device)).to(param_dtype) if bias else None
    for t in (x, y, w, nb, b):
        if t is not None:
            t.requires_grad_(True)
    return x, y, w, nb, b


def check(inputs, dtype, out_dtype=None, eps=1e-6):
    """Against the reference in float64, the truth: torch's own fp32 LayerNorm backward loses
    digits to cancellation where rstd is large (D = 1: rstd = eps**-0.5)."""
    x, y, w, nb, b = inputs
    h_dtype = torch.promote_types(x.dtype, y.dtype)
    ln_dtype = out_dtype or h_dtype  # F.layer_norm returns its input's dtype
    check_against_reference(ops.add_layer_norm, (x, y, w, nb, eps), dtype, kwargs={"bias": b, "out_dtype": out_dtype},
                            ref_dtype=torch.float64, out_dtype=(h_dtype, ln_dtype), in_norm=(2, 3))
    if b is not None:  # the Linear bias: a sum over every row, like the norm's parameters
        check_bias_grad(x, y, w, nb, b, eps, dtype, out_dtype)


def check_bias_grad(x, y, w, nb, b, eps, dtype, out_dtype):
    grads = []
    for backend, up in (("triton", lambda t: t), ("torch", lambda t: t.detach().double().requires_grad_())):
        args = [up(t) for t in (x, y, w, nb, b)]
        h, out = ops.add_layer_norm(*args[:4], eps, bias=args[4], out_dtype=out_dtype, backend=backend)
        gen = torch.Generator(h.device).manual_seed(1)  # the same gradients for both, not the global RNG
        g_h = torch.randn(h.shape, device=h.device, generator=gen)
        g_out = torch.randn(out.shape, device=h.device, generator=gen)
        grads.append(torch.autograd.grad((h.double() * g_h).sum() + (out.double() * g_out).sum(), args[4])[0])
    from conftest import assert_close_in_norm

    assert grads[0].dtype == b.dtype
    assert_close_in_norm(grads[0], grads[1], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", WIDTHS)
@pytest.mark.parametrize("rows", [1, 7])
def test_add_layer_norm_matches_reference(seed, rows, D, dtype):
    check(make_inputs((rows, D), dtype, param_dtype=dtype), dtype)


@pytest.mark.parametrize("shape", [(3, 5, 33), (2, 70, 16), (1, 1, 512)])
def test_add_layer_norm_many_rows_and_no_bias(seed, shape):
    """3-D inputs, several row tiles (70 rows of 16 take two programs' tiles), no Linear bias."""
    check(make_inputs(shape, torch.float32, bias=False), torch.float32)
    check(make_inputs(shape, torch.float32), torch.float32)


def test_add_layer_norm_autocast_dtypes(seed):
    """The autocast pattern: an fp32 residual stream x, a half-precision Linear output y, fp32
    parameters, the norm's output cast for the next Linear. h stays fp32."""
    check(make_inputs((7, 768), torch.float32, y_dtype=torch.float16), torch.float16, out_dtype=torch.float16)
    check(make_inputs((5, 40), torch.float32, y_dtype=torch.bfloat16), torch.bfloat16, out_dtype=torch.bfloat16)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.float16)])
def test_add_layer_norm_branch_scale(seed, dtypes):
    """A per-sample factor on the branch (stochastic depth's floor(keep + rand) / keep): samples
    with factor 0 get only the residual, the others the scaled branch; y's and the bias's gradients
    are scaled too."""
    x_dt, y_dt = dtypes
    inputs = make_inputs((3, 5, 40), x_dt, y_dtype=y_dt)
    scale = torch.tensor([0.0, 1 / 0.9, 1 / 0.9], device=DEV)
    h_dt = torch.promote_types(x_dt, y_dt)
    check_against_reference(ops.add_layer_norm, inputs[:4] + (1e-6,), y_dt, ref_dtype=torch.float64,
                            kwargs={"bias": inputs[4], "branch_scale": scale}, out_dtype=(h_dt, h_dt), in_norm=(2, 3))
    x, y, w, nb, b = inputs
    h, _ = ops.add_layer_norm(x, y, w, nb, bias=b, branch_scale=scale, backend="triton")
    assert torch.equal(h[0], x[0].to(h.dtype))
    with pytest.raises(ValueError, match=r"branch_scale must have shape \(3,\)"):
        ops.add_layer_norm(x, y, w, nb, branch_scale=scale[:2])


def test_add_layer_norm_noncontiguous(seed):
    check(make_inputs((6, 33), torch.float32, noncontig=True), torch.float32)


def test_add_layer_norm_loops_over_row_tiles(seed, monkeypatch):
    """Fewer programs than row tiles: each program's loop accumulates several tiles' partials."""
    monkeypatch.setattr(aln, "_PROGRAMS_CAP", 2)
    check(make_inputs((2, 70, 16), torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", (768, 512, 33))
def test_layer_norm_matches_reference(seed, D, dtype):
    x, _, w, nb, _ = make_inputs((7, D), dtype, param_dtype=dtype)
    check_against_reference(ops.layer_norm, (x, w, nb, 1e-6), dtype, ref_dtype=torch.float64, in_norm=(1, 2))
    x, _, w, nb, _ = make_inputs((3, D), torch.float32)
    check_against_reference(ops.layer_norm, (x, w, nb, 1e-5), torch.float16, kwargs={"out_dtype": torch.float16},
                            ref_dtype=torch.float64, out_dtype=torch.float16, in_norm=(1, 2))


def test_layer_norm_under_autocast_returns_what_layer_norm_returns(seed):
    """CUDA autocast runs F.layer_norm in fp32; CPU autocast leaves it alone."""
    x, _, w, nb, _ = make_inputs((4, 64), torch.float32)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        out = ops.layer_norm(x.bfloat16(), w, nb, backend="triton")
        ref = ops.layer_norm(x.bfloat16(), w, nb, backend="torch")
    assert out.dtype == ref.dtype == (torch.float32 if DEV == "cuda" else torch.bfloat16)
    assert_close(out, ref, torch.bfloat16)


def test_unused_outputs(seed):
    """Only h used (no gradient reaches the norm), or only the norm's output (the last residual
    stream is dropped): the gradients still match. (A random output gradient: a LayerNorm's
    squared outputs sum to nearly a constant, whose gradients would be mostly rounding.)"""
    x, y, w, nb, b = make_inputs((5, 33), torch.float32)
    g = torch.randn(5, 33, device=DEV)
    for pick in (0, 1):
        got = ops.add_layer_norm(x, y, w, nb, bias=b, backend="triton")[pick]
        ref = ops.add_layer_norm(x, y, w, nb, bias=b, backend="torch")[pick]
        for a, e in zip(torch.autograd.grad(got, (x, y, b), g), torch.autograd.grad(ref, (x, y, b), g)):
            assert_close(a, e)


def test_add_layer_norm_backward_is_deterministic(seed):
    x, y, w, nb, b = make_inputs((2, 70, 16), torch.float32)
    runs = []
    for _ in range(2):
        h, out = ops.add_layer_norm(x, y, w, nb, bias=b, backend="triton")
        runs.append(torch.autograd.grad(h.sum() + (out * out).sum(), (x, y, w, nb, b)))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_add_layer_norm_opcheck(seed):
    x, y, w, nb, b = make_inputs((3, 5, 16), torch.float32)
    scale = torch.tensor([0.0, 1.25, 1.25], device=DEV)
    torch.library.opcheck(torch.ops.mae_fast.add_layer_norm.default, (x, y, w, nb, b, 1e-6, torch.float32, None))
    torch.library.opcheck(torch.ops.mae_fast.add_layer_norm.default,
                          (x, y.detach().half().requires_grad_(), w, nb, None, 1e-6, torch.float16, scale))
    torch.library.opcheck(torch.ops.mae_fast.layer_norm.default, (x, w, nb, 1e-6, torch.float16))
    h, _, mean, rstd = torch.ops.mae_fast.add_layer_norm(x, y, w, nb, b, 1e-6, torch.float32, None)
    g = torch.randn_like(x)
    torch.library.opcheck(torch.ops.mae_fast.add_layer_norm_backward.default,
                          (g, g, h.detach(), w.detach(), mean, rstd, torch.float32, torch.float16, None))
    torch.library.opcheck(torch.ops.mae_fast.add_layer_norm_backward.default,
                          (g, None, h.detach(), w.detach(), mean, rstd, torch.float32, torch.float32, scale))


def test_add_layer_norm_torch_compile_fullgraph(seed):
    x, y, w, nb, b = make_inputs((3, 5, 16), torch.float32)

    def f(x, y, w, nb, b):
        h, out = ops.add_layer_norm(x, y, w, nb, bias=b, backend="triton")
        return ops.layer_norm(h, w, nb, backend="triton").sum() + out.square().sum()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, y, w, nb, b)
    loss_r = f(x, y, w, nb, b)
    assert_close(loss, loss_r)
    for a, e in zip(torch.autograd.grad(loss, (x, y, w, nb, b)), torch.autograd.grad(loss_r, (x, y, w, nb, b))):
        assert_close(a, e)


def test_add_layer_norm_bad_inputs():
    x, y, w, nb, b = make_inputs((3, 8), torch.float32)
    f = ops.add_layer_norm
    with pytest.raises(ValueError, match=r"y must have shape \(3, 8\)"):
        f(x, y[:, :4], w, nb)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        f(x, y, w[:4], nb)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        f(x, y, w, nb, bias=b[:3])
    with pytest.raises(TypeError, match="y must be a floating-point tensor"):
        f(x, y.int(), w, nb)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        f(x.tolist(), y, w, nb)
    with pytest.raises(ValueError, match="eps must be a positive float"):
        f(x, y, w, nb, 0.0)
    with pytest.raises(TypeError, match="out_dtype must be a floating torch.dtype"):
        f(x, y, w, nb, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="norm_bias must be on"):
        f(x, y, w, nb.to("meta"))
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16 for the triton backend"):
        f(x.double(), y, w, nb, backend="triton")
    h, out = f(x.double(), y.double(), w.double(), nb.double(), backend="torch")  # float64: the reference
    assert h.dtype == out.dtype == torch.float64
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., D\)"):
        ops.layer_norm(torch.randn(3, 0), w[:0], nb[:0])
    assert "float32, float16 or bfloat16" in aln.add_layer_norm_op.unsupported("triton", x.double(), y, w, nb, 1e-6)


# ------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", (768, 1024, 1280, 512))
def test_add_layer_norm_gpu(seed, dtype, D):
    check(make_inputs((4, 197, D), dtype, param_dtype=dtype, device="cuda"), dtype)
    check(make_inputs((4, 50, D), torch.float32, y_dtype=dtype, device="cuda"), dtype, out_dtype=dtype)


@pytest.mark.gpu
def test_add_layer_norm_inductor_gpu(seed):
    x, y, w, nb, b = make_inputs((4, 50, 768), torch.float32, device="cuda")
    f = lambda *a: ops.add_layer_norm(*a[:4], bias=a[4], backend="triton")[1].square().sum()  # noqa: E731
    assert_close(torch.compile(f, fullgraph=True)(x, y, w, nb, b), f(x, y, w, nb, b))


BODY = """
n = 0
for D in (768, 1280, 512):
    ROWS, BLOCK_D, warps = m._tile(D)
    k = {"ROWS": ROWS, "BLOCK_D": BLOCK_D}
    for x, y, o in (("fp32", "bf16", "bf16"), ("fp16", "fp16", "fp16")):
        c(m._add_ln_fwd_kernel, {"x_ptr": "*" + x, "y_ptr": "*" + y, "bias_ptr": "*fp32", "scale_ptr": "*fp32", "w_ptr": "*fp32", "nb_ptr": "*fp32", "h_ptr": "*" + x, "out_ptr": "*" + o, "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "eps": "fp32"}, {**k, "HAS_Y": True, "HAS_BIAS": True, "HAS_SCALE": x != y}, num_warps=warps); n += 1
        c(m._add_ln_bwd_kernel, {"dout_ptr": "*" + o, "dh_ptr": "*" + x, "h_ptr": "*" + x, "w_ptr": "*fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "scale_ptr": "*fp32", "dx_ptr": "*" + x, "dy_ptr": "*" + y, "part_ptr": "*fp32"}, {**k, "HAS_DH": True, "HAS_SCALE": x != y, "WRITE_DY": True}, num_warps=warps); n += 1
"""


test_kernels_compile_for_sm90 = sm90_compile_test("residual_norm", BODY, 12)
