"""Un-shuffle with mask tokens: the Triton kernels against the torch reference, forward and backward.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest): fp32 and fp16, tiny shapes.
"""
import pytest
import torch

from conftest import assert_close, check_against_reference
from mae_fast import ops
from mae_fast.ops._triton import why_not_triton
from triton_compile import sm90_compile_test

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(why_not_triton(torch.device(DEV)) is not None,
                                reason=f"triton unusable: {why_not_triton(torch.device(DEV))}")

# (N, L, K, d): L=7, K=1, K=L-1, N=1, L larger than the backward's row chunk (16), d > one block
CASES = [(2, 7, 3, 5), (1, 7, 1, 8), (3, 7, 6, 33), (2, 20, 5, 4), (1, 3, 1, 1100)]


def make_inputs(N, L, K, d, dtype, device=DEV, noncontig=False, pos_grad=True):
    ids_restore = torch.rand(N, L, device=device).argsort(1).argsort(1)
    if noncontig:
        x = torch.randn(N, 1 + K, 2 * d, device=device).to(dtype)[..., ::2]
        ids_restore = ids_restore.t().contiguous().t()
        mask_token = torch.randn(1, 1, 3 * d, device=device).to(dtype)[..., ::3]
        pos = torch.randn(1, d, 1 + L, device=device).to(dtype).transpose(1, 2)
        assert not (x.is_contiguous() or ids_restore.is_contiguous() or pos.is_contiguous())
    else:
        x = torch.randn(N, 1 + K, d, device=device).to(dtype)
        mask_token = torch.randn(1, 1, d, device=device).to(dtype)
        pos = torch.randn(1, 1 + L, d, device=device).to(dtype)
    x.requires_grad_(True)
    mask_token.requires_grad_(True)
    pos.requires_grad_(pos_grad)
    return x, ids_restore, mask_token, pos


def check(inputs, dtype, grad_noncontig=False):
    g = None
    if grad_noncontig:
        N, L1, d = inputs[0].shape[0], inputs[1].shape[1] + 1, inputs[0].shape[2]
        g = torch.randn(d, L1, N, device=inputs[0].device).to(dtype).permute(2, 1, 0)
    check_against_reference(ops.unshuffle_mask_tokens, inputs, dtype, grad_out=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_unshuffle_matches_reference(seed, case, dtype):
    check(make_inputs(*case, dtype), dtype)


def test_unshuffle_noncontiguous(seed):
    check(make_inputs(2, 7, 3, 5, torch.float32, noncontig=True), torch.float32, grad_noncontig=True)


def test_unshuffle_frozen_pos(seed):
    check(make_inputs(2, 7, 2, 6, torch.float32, pos_grad=False), torch.float32)


def test_unshuffle_deterministic(seed):
    x, ids, mt, pos = make_inputs(3, 20, 4, 8, torch.float32)
    res = []
    for _ in range(2):
        out = ops.unshuffle_mask_tokens(x, ids, mt, pos, backend="triton")
        res.append(torch.autograd.grad(out, (x, mt, pos), torch.ones_like(out) / 3))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_unshuffle_autocast(seed):
    x, ids, mt, pos = make_inputs(2, 7, 3, 5, torch.float32)
    dt = torch.bfloat16 if DEV == "cpu" else torch.float16
    xl = x.detach().to(dt).requires_grad_()  # a Linear's output under autocast
    with torch.autocast(DEV, dtype=dt):
        out = ops.unshuffle_mask_tokens(xl, ids, mt, pos, backend="triton")
        ref = ops.unshuffle_mask_tokens(xl, ids, mt, pos, backend="torch")
    assert out.dtype == ref.dtype == torch.float32
    assert_close(out, ref)
    out.sum().backward()
    assert xl.grad.dtype == dt and mt.grad.dtype == torch.float32


def test_unshuffle_opcheck(seed):
    x, ids, mt, pos = make_inputs(2, 5, 2, 4, torch.float32)
    torch.library.opcheck(torch.ops.mae_fast.unshuffle_mask_tokens.default, (x, ids, mt, pos))
    g = torch.randn(2, 6, 4, device=DEV)
    torch.library.opcheck(torch.ops.mae_fast.unshuffle_mask_tokens_backward.default, (g, ids, 2, torch.float32))


def test_unshuffle_torch_compile_fullgraph(seed):
    x, ids, mt, pos = make_inputs(2, 7, 3, 5, torch.float32, pos_grad=False)

    def f(x, ids, mt, pos):
        return ops.unshuffle_mask_tokens(x, ids, mt, pos, backend="triton").square().sum()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, ids, mt, pos)
    grads = torch.autograd.grad(loss, (x, mt))
    loss_r = f(x, ids, mt, pos)
    for a, b in zip(grads, torch.autograd.grad(loss_r, (x, mt))):
        assert_close(a, b)
    assert_close(loss, loss_r)


def test_unshuffle_bad_inputs(monkeypatch):
    x, ids, mt, pos = make_inputs(2, 7, 3, 5, torch.float32)
    u = ops.unshuffle_mask_tokens
    with pytest.raises(TypeError, match="ids_restore must be int64"):
        u(x, ids.int(), mt, pos, backend="triton")
    with pytest.raises(ValueError, match="mask_token must have shape"):
        u(x, ids, mt[..., :3], pos, backend="triton")
    with pytest.raises(ValueError, match="pos_embed must have shape"):
        u(x, ids, mt, pos[:, :-1], backend="triton")
    with pytest.raises(ValueError, match="ids_restore must have shape"):
        u(x, ids[:1], mt, pos, backend="triton")
    with pytest.raises(ValueError, match="x must be 3-D"):
        u(x[0], ids, mt, pos, backend="triton")
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16 for the triton backend"):
        u(x.double(), ids, mt, pos, backend="triton")
    with pytest.raises(TypeError, match="mask_token must be a floating-point tensor"):
        u(x, ids, mt.int(), pos, backend="torch")
    u(x.double(), ids, mt.double(), pos.double(), backend="torch")  # float64: the reference backend
    with pytest.raises(ValueError, match="ids_restore must be on"):
        u(x, ids.to("meta"), mt, pos, backend="triton")
    monkeypatch.setenv("MAE_FAST_CHECK_IDS", "1")
    bad = ids.clone()
    bad[0, 0] = bad[0, 1]
    with pytest.raises(ValueError, match="must not repeat"):
        u(x, bad, mt, pos, backend="triton")
    bad[0, 0] = -1
    with pytest.raises(ValueError, match=r"ids_restore must hold ids in \[0, 7\)"):
        u(x, bad, mt, pos, backend="triton")


# ------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unshuffle_vit_b_gpu(seed, dtype):
    check(make_inputs(8, 196, 49, 512, dtype, device="cuda"), dtype)


@pytest.mark.gpu
def test_unshuffle_inductor_gpu(seed):
    x, ids, mt, pos = make_inputs(4, 196, 49, 64, torch.float32, device="cuda", pos_grad=False)
    f = lambda *a: ops.unshuffle_mask_tokens(*a, backend="triton").square().sum()  # noqa: E731
    loss = torch.compile(f, fullgraph=True)(x, ids, mt, pos)
    assert_close(loss, f(x, ids, mt, pos))


BODY = """
n = 0
for dt in ("fp32", "fp16", "bf16"):
    c(m._unshuffle_fwd_kernel, {"x_ptr": "*" + dt, "ids_ptr": "*i64", "mt_ptr": "*fp32", "pos_ptr": "*" + dt, "out_ptr": "*" + dt}, {"ROWS": 8, "BLOCK_D": 512}); n += 1
    c(m._unshuffle_bwd_kernel, {"g_ptr": "*" + dt, "ids_ptr": "*i64", "dx_ptr": "*" + dt, "part_ptr": "*fp32"}, {"CHUNK": 16, "BLOCK_D": 512}, num_warps=8, aligned=("g_ptr", "dx_ptr", "d", "s_gn", "s_gl")); n += 1
"""


def test_unshuffle_declines_for_auto():
    """A dtype the kernels do not take is declined, so that backend='auto' uses the reference."""
    op = ops.unshuffle.unshuffle_mask_tokens_op
    x, mt, pos = (torch.randn(*s, device=DEV) for s in ((2, 3, 8), (1, 1, 8), (1, 5, 8)))
    ids = torch.randperm(4, device=DEV).repeat(2, 1)
    assert op.unsupported("triton", x, ids, mt, pos) is None
    assert "x must be float32, float16 or bfloat16" in op.unsupported("triton", x.double(), ids, mt, pos)


test_kernels_compile_for_sm90 = sm90_compile_test("unshuffle", BODY, 6)
