"""Bias + exact GELU: the Triton kernels against the torch reference, forward and backward.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest): fp32 and fp16, few rows.
"""
import pytest
import torch

from conftest import assert_close, check_against_reference
from mae_fast import ops
from mae_fast.ops import gelu
from mae_fast.ops._triton import why_not_triton
from triton_compile import sm90_compile_test

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(why_not_triton(torch.device(DEV)) is not None,
                                reason=f"triton unusable: {why_not_triton(torch.device(DEV))}")

# every MLP width (ViT-B/L/H, the decoder), past one column block (1024), odd, one column
WIDTHS = (3072, 4096, 5120, 2048, 1100, 33, 1)


def make_inputs(shape, dtype, *, bias_dtype=torch.float32, device=DEV, noncontig=False):
    F_ = shape[-1]
    if noncontig:
        x = torch.randn(*shape[:-1], 2 * F_, device=device).to(dtype)[..., 1::2]
        b = torch.randn(3 * F_, device=device).to(bias_dtype)[::3]
    else:
        x = torch.randn(shape, device=device).to(dtype)
        b = torch.randn(F_, device=device).to(bias_dtype)
    return x.requires_grad_(True), b.requires_grad_(True)


def check(inputs, dtype):
    """Against the exact (float64) value of the op's function, its one rounding included: the
    pre-activation ``t = x + bias`` is rounded to x's dtype, as the reference does it in that dtype
    (upcast first, it would be skipped, and near gelu' = 0 a half-precision t's rounding moves dx
    by more than a low-precision tolerance). The bias gradient sums over every row: in norm."""
    low = inputs[0].dtype

    def reference(x, bias):
        return torch.nn.functional.gelu((x + bias.to(low)).to(low).to(x.dtype))
    check_against_reference(ops.bias_gelu, inputs, dtype, ref_dtype=torch.float64, in_norm=(1,), reference=reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("F", WIDTHS)
@pytest.mark.parametrize("rows", [1, 5])
def test_bias_gelu_matches_reference(seed, rows, F, dtype):
    check(make_inputs((rows, F), dtype), dtype)


def test_bias_gelu_shapes_dtypes_layouts(seed, monkeypatch):
    check(make_inputs((2, 9, 40), torch.float32, noncontig=True), torch.float32)
    check(make_inputs((3, 70, 16), torch.float16, bias_dtype=torch.float16), torch.float16)
    check(make_inputs((3, 4, 20), torch.bfloat16), torch.bfloat16)
    monkeypatch.setattr(gelu, "_PROGRAMS_CAP", 2)  # each program's loop sums several row tiles
    check(make_inputs((3, 70, 16), torch.float32), torch.float32)


def test_bias_gelu_is_the_exact_gelu(seed):
    """erf, not the tanh approximation, whose values differ by ~1e-4 near |t| = 2."""
    t = torch.linspace(-4, 4, 801, device=DEV)
    out = ops.bias_gelu(t.view(1, -1), torch.zeros(801, device=DEV), backend="triton")
    assert_close(out.view(-1), torch.nn.functional.gelu(t.double()), torch.float32)
    assert (out.view(-1) - torch.nn.functional.gelu(t, approximate="tanh")).abs().max() > 1e-5


def test_bias_gelu_backward_is_deterministic(seed):
    x, b = make_inputs((3, 70, 16), torch.float32)
    g = torch.randn(3, 70, 16, device=DEV)
    runs = [torch.autograd.grad(ops.bias_gelu(x, b, backend="triton"), (x, b), g) for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_bias_gelu_opcheck(seed):
    x, b = make_inputs((3, 5, 24), torch.float32)
    torch.library.opcheck(torch.ops.mae_fast.bias_gelu.default, (x, b))
    torch.library.opcheck(torch.ops.mae_fast.bias_gelu_backward.default, (torch.randn_like(x), x.detach(), b.detach()))


def test_bias_gelu_torch_compile_fullgraph(seed):
    x, b = make_inputs((3, 5, 24), torch.float32)
    f = lambda x, b: ops.bias_gelu(x, b, backend="triton").square().sum()  # noqa: E731
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, b)
    assert_close(loss, f(x, b))
    for a, e in zip(torch.autograd.grad(loss, (x, b)), torch.autograd.grad(f(x, b), (x, b))):
        assert_close(a, e)


def test_bias_gelu_bad_inputs():
    x, b = make_inputs((3, 8), torch.float32)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        ops.bias_gelu(x, b[:4])
    with pytest.raises(ValueError, match="bias must be 1-D"):
        ops.bias_gelu(x, b.view(2, 4))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.bias_gelu(x.int(), b)
    with pytest.raises(ValueError, match="bias must be on"):
        ops.bias_gelu(x, b.to("meta"))
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16 for the triton backend"):
        ops.bias_gelu(x.double(), b, backend="triton")
    assert ops.bias_gelu(x.double(), b, backend="torch").dtype == torch.float64


# ------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("F", (3072, 4096, 5120, 2048))
def test_bias_gelu_gpu(seed, dtype, F):
    check(make_inputs((4, 197, F), dtype, device="cuda"), dtype)


BODY = """
n = 0
for dt in ("fp32", "fp16", "bf16"):
    ROWS, BLOCK_F = m._tile(4096)
    k = {"ROWS": ROWS, "BLOCK_F": BLOCK_F}
    c(m._bias_gelu_fwd_kernel, {"x_ptr": "*" + dt, "b_ptr": "*fp32", "out_ptr": "*" + dt}, k, num_warps=8); n += 1
    c(m._bias_gelu_bwd_kernel, {"g_ptr": "*" + dt, "x_ptr": "*" + dt, "b_ptr": "*fp32", "dx_ptr": "*" + dt, "part_ptr": "*fp32"}, k, num_warps=8); n += 1
"""


test_kernels_compile_for_sm90 = sm90_compile_test("gelu", BODY, 6)
