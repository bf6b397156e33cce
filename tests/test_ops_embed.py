"""Visible-patch embedding: the Triton path (gather kernel -> one GEMM -> fused epilogue) against the
torch reference (conv over all patches, + pos_embed, gather, cat cls), forward and backward.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest): fp32 and fp16 only, tiny shapes.
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

# (N, C, P, h, w, D, K): odd sizes: L=7 on a 1x7 grid, K=1, K=L-1, N=1, P=14, C=1
CASES = [
    (2, 3, 4, 2, 3, 8, 3),
    (1, 1, 14, 1, 7, 5, 1),
    (2, 2, 2, 1, 7, 6, 6),
]


def make_inputs(N, C, P, h, w, D, K, dtype, device=DEV, noncontig=False, pos_grad=True, img_grad=True):
    L = h * w
    H, W = h * P, w * P
    if noncontig:
        # imgs channels-last, ids_keep transposed storage, pos_embed / cls / bias strided views
        imgs = torch.randn(N, C, H, W, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        ids = torch.rand(N, L, device=device).argsort(1)[:, :K].t().contiguous().t()
        pos = torch.randn(1, 1 + L, 2 * D, device=device).to(dtype)[..., ::2]
        cls = torch.randn(1, 1, 2 * D, device=device).to(dtype)[..., 1::2]
        bias = torch.randn(2 * D, device=device).to(dtype)[::2]
        assert not (imgs.is_contiguous() or ids.is_contiguous() or pos.is_contiguous() or bias.is_contiguous())
    else:
        imgs = torch.randn(N, C, H, W, device=device).to(dtype)
        ids = torch.rand(N, L, device=device).argsort(1)[:, :K]
        pos = torch.randn(1, 1 + L, D, device=device).to(dtype)
        cls = torch.randn(1, 1, D, device=device).to(dtype)
        bias = torch.randn(D, device=device).to(dtype)
    weight = (torch.randn(D, C, P, P, device=device) / (C * P * P) ** 0.5).to(dtype)
    imgs.requires_grad_(img_grad)
    pos.requires_grad_(pos_grad)
    for t in (weight, bias, cls):
        t.requires_grad_(True)
    return imgs, ids, weight, bias, pos, cls


def check_embed(inputs, dtype):
    """Against the torch reference in float64, the truth: a GEMM over C*P*P = 768 terms in fp32
    (ours, or the reference's conv in another summation order) meets it to fp32 rounding, where two
    fp32 orders need not meet each other. weight and bias gradients sum over all N*K kept patches."""
    check_against_reference(ops.embed_visible_patches, inputs, dtype, ref_dtype=torch.float64, in_norm=(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_embed_matches_reference(seed, case, dtype):
    check_embed(make_inputs(*case, dtype), dtype)


def test_embed_noncontiguous(seed):
    check_embed(make_inputs(2, 3, 4, 2, 3, 8, 3, torch.float32, noncontig=True), torch.float32)


def test_embed_model_grads_only(seed):
    """The model's case: frozen pos_embed, imgs without grad."""
    check_embed(make_inputs(2, 3, 4, 2, 3, 8, 5, torch.float32, pos_grad=False, img_grad=False), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES[:2])
def test_gather_patches_exact(seed, case, dtype):
    N, C, P, h, w, D, K = case
    imgs = torch.randn(N, C, h * P, w * P, device=DEV).to(dtype)[..., :]
    ids = torch.rand(N, h * w, device=DEV).argsort(1)[:, :K]
    a = ops.gather_patches(imgs, ids, P, backend="triton")
    b = ops.gather_patches(imgs, ids, P, backend="torch")
    assert torch.equal(a, b)
    # the backward: a scatter of the kept patches into zeros
    x = imgs.detach().requires_grad_()
    g = torch.randn_like(a)
    (da,) = torch.autograd.grad(ops.gather_patches(x, ids, P, backend="triton"), x, g)
    (db,) = torch.autograd.grad(ops.gather_patches(x, ids, P, backend="torch"), x, g)
    assert torch.equal(da, db)


def test_gather_patches_noncontiguous(seed):
    base = torch.randn(2, 3, 8, 24, device=DEV)
    imgs = base[..., ::2]  # W stride 2
    ids = torch.rand(2, 6, device=DEV).argsort(1)[:, :4].t().contiguous().t()
    assert torch.equal(ops.gather_patches(imgs, ids, 4, backend="triton"),
                       ops.gather_patches(imgs, ids, 4, backend="torch"))


def test_embed_deterministic(seed):
    imgs, ids, weight, bias, pos, cls = make_inputs(3, 3, 2, 2, 2, 8, 3, torch.float32)
    outs = []
    for _ in range(2):
        out = ops.embed_visible_patches(imgs, ids, weight, bias, pos, cls, backend="triton")
        outs.append(torch.autograd.grad(out, (pos, cls, bias), torch.ones_like(out)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_embed_autocast(seed):
    """Under autocast the triton path gives the reference's dtype (fp32 after + pos_embed)."""
    imgs, ids, weight, bias, pos, cls = make_inputs(2, 3, 4, 2, 3, 8, 3, torch.float32)
    # Small conv outputs: the reference rounds (conv + bias) to the autocast dtype once, the triton
    # path rounds the GEMM output and adds the bias in fp32; |y| < 1 keeps both within tol(bf16).
    imgs = (imgs.detach() / 4).requires_grad_()
    with torch.no_grad():
        bias /= 4
    dt = torch.bfloat16 if DEV == "cpu" else torch.float16
    with torch.autocast(DEV, dtype=dt):
        out = ops.embed_visible_patches(imgs, ids, weight, bias, pos, cls, backend="triton")
        ref = ops.embed_visible_patches(imgs, ids, weight, bias, pos, cls, backend="torch")
    assert out.dtype == ref.dtype
    assert_close(out, ref, dt)
    out.sum().backward()
    assert weight.grad.dtype == weight.dtype and imgs.grad.dtype == imgs.dtype


def test_embed_opcheck(seed):
    imgs, ids, weight, bias, pos, cls = make_inputs(2, 2, 2, 1, 3, 4, 2, torch.float32)
    P = 2
    torch.library.opcheck(torch.ops.mae_fast.gather_patches.default, (imgs, ids, P, torch.float32))
    y = torch.randn(2, 2, 4, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.mae_fast.embed_epilogue.default, (y, ids, bias, pos, cls))
    pat = torch.randn(2, 2, 8, device=DEV)
    torch.library.opcheck(torch.ops.mae_fast.scatter_patches.default, (pat, ids, P, 2, 2, 6, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))


def test_embed_torch_compile_fullgraph(seed):
    """torch.compile(fullgraph=True) traces forward and backward without a graph break (aot_eager:
    the custom ops' fake and autograd registrations; inductor's codegen is exercised on the GPU)."""
    imgs, ids, weight, bias, pos, cls = make_inputs(2, 3, 2, 2, 2, 4, 2, torch.float32, pos_grad=False)

    def f(imgs, ids, weight, bias, pos, cls):
        return ops.embed_visible_patches(imgs, ids, weight, bias, pos, cls, backend="triton").square().sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = cf(imgs, ids, weight, bias, pos, cls)
    grads = torch.autograd.grad(loss, (imgs, weight, bias, cls))
    loss_r = f(imgs, ids, weight, bias, pos, cls)
    grads_r = torch.autograd.grad(loss_r, (imgs, weight, bias, cls))
    assert_close(loss, loss_r)
    for a, b in zip(grads, grads_r):
        assert_close(a, b)


def test_embed_bad_inputs():
    imgs, ids, weight, bias, pos, cls = make_inputs(2, 3, 4, 2, 3, 8, 3, torch.float32)
    e = ops.embed_visible_patches
    with pytest.raises(TypeError, match="ids_keep must be int64"):
        e(imgs, ids.int(), weight, bias, pos, cls, backend="triton")
    with pytest.raises(ValueError, match="pos_embed must have shape"):
        e(imgs, ids, weight, bias, pos[:, 1:], cls, backend="triton")
    with pytest.raises(ValueError, match="multiples of patch_size"):
        e(imgs[..., 1:], ids, weight, bias, pos, cls, backend="triton")
    with pytest.raises(ValueError, match="weight must have shape"):
        e(imgs[:, :2], ids, weight, bias, pos, cls, backend="triton")
    with pytest.raises(ValueError, match="ids_keep must have shape"):
        e(imgs, ids[:1], weight, bias, pos, cls, backend="triton")
    with pytest.raises(TypeError, match="imgs must be float32, float16 or bfloat16 for the triton backend"):
        e(imgs.double(), ids, *(t.double() for t in (weight, bias, pos, cls)), backend="triton")
    with pytest.raises(TypeError, match="imgs must be a floating-point tensor"):
        e(imgs.long(), ids, weight, bias, pos, cls, backend="torch")
    # float64 stays available on the reference backend
    e(imgs.double(), ids, *(t.double() for t in (weight, bias, pos, cls)), backend="torch")
    with pytest.raises(TypeError, match="weight must have imgs' dtype"):
        e(imgs.half(), ids, weight, bias, pos, cls, backend="triton")
    with pytest.raises(ValueError, match="ids_keep must be on"):
        e(imgs, ids.to("meta"), weight, bias, pos, cls, backend="triton")
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        ops.gather_patches(imgs, ids, 0, backend="triton")


def test_why_not_triton():
    assert why_not_triton(torch.device(DEV)) is None
    assert "meta" in why_not_triton(torch.device("meta"))
    if DEV == "cpu":
        # the backend switch: auto stays on the reference for CPU tensors, triton is used on request
        args = make_inputs(2, 3, 4, 2, 3, 8, 3, torch.float32)
        name, _ = ops.embed.embed_visible_patches_op.select(args, "auto")
        assert name == "torch"
        assert ops.embed.embed_visible_patches_op.select(args, "triton")[0] == "triton"


def test_check_ids_debug_mode(monkeypatch):
    imgs, ids, weight, bias, pos, cls = make_inputs(2, 3, 4, 2, 3, 8, 3, torch.float32)
    bad = ids.clone()
    bad[1, 0] = 6  # L = 6: out of range
    monkeypatch.setenv("MAE_FAST_CHECK_IDS", "1")
    with pytest.raises(ValueError, match=r"ids_keep must hold ids in \[0, 6\)"):
        ops.embed_visible_patches(imgs, bad, weight, bias, pos, cls, backend="triton")
    dup = ids.clone()
    dup[0, 1] = dup[0, 0]
    with pytest.raises(ValueError, match="must not repeat"):
        ops.gather_patches(imgs, dup, 4, backend="triton")


# ------------------------------------------------------------------------------------ GPU

@pytest.fixture
def no_tf32():
    """The reference's conv would use TF32 in fp32 on the GPU (cuDNN's default), and cuBLAS may
    reduce fp16/bf16 GEMMs in reduced precision: switch both off so that the GEMM accumulates in
    fp32 and fp32 is compared with fp32."""
    m = torch.backends.cuda.matmul
    old = (torch.backends.cudnn.allow_tf32, m.allow_tf32, m.allow_fp16_reduced_precision_reduction,
           m.allow_bf16_reduced_precision_reduction)
    torch.backends.cudnn.allow_tf32 = m.allow_tf32 = False
    m.allow_fp16_reduced_precision_reduction = m.allow_bf16_reduced_precision_reduction = False
    yield
    (torch.backends.cudnn.allow_tf32, m.allow_tf32, m.allow_fp16_reduced_precision_reduction,
     m.allow_bf16_reduced_precision_reduction) = old


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_embed_vit_b_gpu(seed, no_tf32, dtype):
    # ViT-B: N=8, 14x14 patches of 16, K=49 kept, D=768
    check_embed(make_inputs(8, 3, 16, 14, 14, 768, 49, dtype, device="cuda"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gather_patches_vit_h_gpu(seed, dtype):
    imgs = torch.randn(4, 3, 224, 224, device="cuda", dtype=dtype)
    ids = torch.rand(4, 256, device="cuda").argsort(1)[:, :64]
    assert torch.equal(ops.gather_patches(imgs, ids, 14, backend="triton"),
                       ops.gather_patches(imgs, ids, 14, backend="torch"))


@pytest.mark.gpu
def test_embed_inductor_gpu(seed, no_tf32):
    imgs, ids, weight, bias, pos, cls = make_inputs(4, 3, 16, 4, 4, 64, 4, torch.float32, device="cuda",
                                                    pos_grad=False)
    f = lambda *a: ops.embed_visible_patches(*a, backend="triton").square().sum()  # noqa: E731
    loss = torch.compile(f, fullgraph=True)(imgs, ids, weight, bias, pos, cls)
    assert_close(loss, f(imgs, ids, weight, bias, pos, cls))


def test_embed_wide_rows(seed):
    """D and C*P*P above one block (1024): the kernels' second column block."""
    check_embed(make_inputs(1, 5, 16, 1, 3, 1100, 2, torch.float32), torch.float32)


BODY = """
n = 0
for dt in ("fp32", "fp16", "bf16"):
    for sc in (False, True):
        c(m._patch_copy_kernel, {"img_ptr": "*fp32", "ids_ptr": "*i64", "pat_ptr": "*" + dt}, {"P": 16, "ROWS": 4, "BLOCK": 1024, "SCATTER": sc}); n += 1
    c(m._embed_epilogue_kernel, {"y_ptr": "*" + dt, "ids_ptr": "*i64", "bias_ptr": "*fp32", "pos_ptr": "*" + dt, "cls_ptr": "*" + dt, "out_ptr": "*" + dt}, {"ROWS": 4, "BLOCK_D": 1024}); n += 1
"""


def test_embed_keep_none(seed):
    """K = 0: only the cls row (the model rejects such ratios; the op still answers)."""
    imgs, ids, weight, bias, pos, cls = make_inputs(2, 3, 4, 2, 3, 8, 1, torch.float32)
    ids = ids[:, :0]
    out = ops.embed_visible_patches(imgs, ids, weight, bias, pos, cls, backend="triton")
    assert_close(out, ops.embed_visible_patches(imgs, ids, weight, bias, pos, cls, backend="torch"))


def test_embed_declines_for_auto():
    """A dtype the kernels do not take is declined, so that backend='auto' uses the reference."""
    embed, gather = ops.embed.embed_visible_patches_op, ops.embed.gather_patches_op
    imgs, ids = torch.randn(1, 3, 8, 8, device=DEV), torch.tensor([[0, 3]], device=DEV)
    args = [torch.randn(*s, device=DEV) for s in ((4, 3, 4, 4), (4,), (1, 5, 4), (1, 1, 4))]
    assert embed.unsupported("triton", imgs, ids, *args) is None and gather.unsupported("triton", imgs, ids, 4) is None
    assert "imgs must be float32" in embed.unsupported("triton", imgs.double(), ids, *args)
    assert "imgs must be float32" in gather.unsupported("triton", imgs.double(), ids, 4)


test_kernels_compile_for_sm90 = sm90_compile_test("embed", BODY, 9)
