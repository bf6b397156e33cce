"""Patch MSE loss: the Triton kernels (NCHW read, per-patch norm, MSE per patch) against the torch
reference, forward and backward, with full pred and with pred for the removed patches only.

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

# (N, C, P, h, w, K): L=7 on a 1x7 grid, K=1, K=L-1, N=1, P=14, C=1, P*P*C=588 (ViT-H/14)
CASES = [
    (2, 3, 4, 2, 3, 2),
    (1, 1, 14, 1, 7, 1),
    (2, 2, 2, 1, 7, 6),
    (1, 3, 14, 1, 2, 1),
    (1, 3, 20, 2, 1, 1),  # P*P*C = 1200: a 2048-wide block
]


def make_inputs(N, C, P, h, w, K, dtype, device=DEV, masked_only=False, noncontig=False, img_grad=False):
    L = h * w
    PPC = P * P * C
    ids_shuffle = torch.rand(N, L, device=device).argsort(1)
    mask = torch.ones(N, L, device=device)
    mask.scatter_(1, ids_shuffle[:, :K], 0.0)
    M = L - K if masked_only else L
    if noncontig:
        imgs = torch.randn(N, C, h * P, w * P, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        pred = torch.randn(PPC, M, N, device=device).to(dtype).permute(2, 1, 0)
        mask = mask.t().contiguous().t()
        assert not (pred.is_contiguous() or (C > 1 and imgs.is_contiguous()) or (N > 1 and mask.is_contiguous()))
    else:
        imgs = torch.randn(N, C, h * P, w * P, device=device).to(dtype)
        pred = torch.randn(N, M, PPC, device=device).to(dtype)
    pred.requires_grad_(True)
    imgs.requires_grad_(img_grad)
    kw = {"pred_ids": ids_shuffle[:, K:]} if masked_only else {}
    return pred, imgs, mask, kw


def check(pred, imgs, mask, P, norm, kw, dtype):
    # the reference's dtype for the same inputs (a float32 mask promotes the loss to float32)
    out_dtype = ops.patch_mse_loss(pred.detach(), imgs.detach(), mask, P, norm, backend="torch", **kw).dtype
    check_against_reference(ops.patch_mse_loss, (pred, imgs, mask, P, norm), dtype, kwargs=kw, out_dtype=out_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_patch_mse_matches_reference(seed, case, norm, dtype):
    N, C, P, h, w, K = case
    pred, imgs, mask, kw = make_inputs(*case, dtype)
    check(pred, imgs, mask, P, norm, kw, dtype)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("case", CASES[:3])
def test_patch_mse_masked_only(seed, case, norm):
    """pred for the removed patches only, with their ids: the same loss as the full pred."""
    N, C, P, h, w, K = case
    pred, imgs, mask, kw = make_inputs(*case, torch.float32, masked_only=True)
    check(pred, imgs, mask, P, norm, kw, torch.float32)
    full = torch.randn(N, h * w, P * P * C, device=DEV)
    full.scatter_(1, kw["pred_ids"].unsqueeze(-1).expand_as(pred), pred.detach())
    assert_close(ops.patch_mse_loss(pred, imgs, mask, P, norm, backend="triton", **kw),
                 ops.patch_mse_loss(full, imgs, mask, P, norm, backend="torch"))


@pytest.mark.parametrize("masked_only", [False, True])
@pytest.mark.parametrize("norm", [False, True])
def test_patch_mse_imgs_grad(seed, norm, masked_only):
    pred, imgs, mask, kw = make_inputs(2, 3, 2, 2, 3, 2, torch.float32, masked_only=masked_only, img_grad=True)
    check(pred, imgs, mask, 2, norm, kw, torch.float32)


@pytest.mark.parametrize("masked_only", [False, True])
def test_patch_mse_noncontiguous(seed, masked_only):
    pred, imgs, mask, kw = make_inputs(2, 3, 4, 2, 3, 2, torch.float32, masked_only=masked_only, noncontig=True)
    check(pred, imgs, mask, 4, True, kw, torch.float32)


def test_patch_mse_mask_grad(seed):
    """A mask that requires grad: nothing is skipped, its gradient matches the reference."""
    pred, imgs, mask, kw = make_inputs(2, 3, 2, 2, 3, 2, torch.float32)
    mask = mask.requires_grad_()
    (a,) = torch.autograd.grad(ops.patch_mse_loss(pred, imgs, mask, 2, True, backend="triton"), mask)
    (b,) = torch.autograd.grad(ops.patch_mse_loss(pred, imgs, mask, 2, True, backend="torch"), mask)
    assert_close(a, b)


def test_patch_mse_deterministic(seed):
    pred, imgs, mask, kw = make_inputs(3, 3, 4, 2, 3, 2, torch.float32)
    res = []
    for _ in range(2):
        loss = ops.patch_mse_loss(pred, imgs, mask, 4, True, backend="triton")
        res.append((loss, *torch.autograd.grad(loss, pred)))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_patch_mse_autocast(seed):
    """Under autocast pred comes out of a Linear in low precision, imgs stay fp32: the loss is fp32."""
    pred, imgs, mask, kw = make_inputs(2, 3, 4, 2, 3, 2, torch.float32)
    dt = torch.bfloat16 if DEV == "cpu" else torch.float16
    pl = pred.detach().to(dt).requires_grad_()
    with torch.autocast(DEV, dtype=dt):
        loss = ops.patch_mse_loss(pl, imgs, mask, 4, True, backend="triton")
        ref = ops.patch_mse_loss(pl, imgs, mask, 4, True, backend="torch")
    assert loss.dtype == ref.dtype == torch.float32
    # the truth: the same values in float64 (CUDA autocast may run parts of the reference in low precision)
    exact = ops.patch_mse_loss(pl.detach().double(), imgs.double(), mask.double(), 4, True, backend="torch")
    assert_close(loss.double(), exact, torch.float32)
    loss.backward()
    assert pl.grad.dtype == dt


def test_patch_mse_opcheck(seed):
    pred, imgs, mask, kw = make_inputs(2, 2, 2, 1, 3, 1, torch.float32, masked_only=True)
    ids = kw["pred_ids"]
    fused = torch.ops.mae_fast.patch_mse_loss.default
    torch.library.opcheck(fused, (pred, imgs, mask, ids, 2, True, torch.float32))
    pred2, imgs2, mask2, _ = make_inputs(2, 2, 2, 1, 3, 1, torch.float32, img_grad=True)
    torch.library.opcheck(fused, (pred2, imgs2, mask2.bool(), None, 2, False, torch.float32))
    msum = mask.sum()
    torch.library.opcheck(torch.ops.mae_fast.patch_mse_loss_backward.default,
                          (torch.tensor(0.5, device=DEV), pred.detach(), imgs, mask, ids, msum, 2, True))
    per_patch = torch.ops.mae_fast.patch_mse_per_patch.default
    torch.library.opcheck(per_patch, (pred, imgs, ids, 2, True))
    torch.library.opcheck(per_patch, (pred2, imgs2, None, 2, False))
    g = torch.rand(2, 2, device=DEV)
    torch.library.opcheck(torch.ops.mae_fast.patch_mse_per_patch_backward.default,
                          (g, pred.detach(), imgs, ids, 2, True))


@pytest.mark.parametrize("masked_only", [False, True])
def test_patch_mse_bool_mask(seed, masked_only):
    """A bool mask (True = removed) is read as is: the same loss and gradient as its float copy."""
    pred, imgs, mask, kw = make_inputs(2, 3, 4, 2, 3, 2, torch.float32, masked_only=masked_only)
    loss = ops.patch_mse_loss(pred, imgs, mask.bool(), 4, True, backend="triton", **kw)
    ref = ops.patch_mse_loss(pred, imgs, mask, 4, True, backend="torch", **kw)
    assert_close(loss, ref)
    assert_close(torch.autograd.grad(loss, pred)[0], torch.autograd.grad(ref, pred)[0])


@pytest.mark.parametrize("masked_only", [False, True])
def test_patch_mse_many_programs(seed, masked_only):
    """Patches spread over several programs, the last one part-filled, and the mask sum split
    between them: P=14, C=3 tiles hold 4 patches, so N*L = 18 rows take 5 programs."""
    from mae_fast.ops.patch_mse import _tile

    pred, imgs, mask, kw = make_inputs(3, 3, 14, 2, 3, 2, torch.float32, masked_only=masked_only)
    assert _tile(imgs, 14)["R"] == 4
    check(pred, imgs, mask, 14, True, kw, torch.float32)


def test_patch_mse_no_predicted_patch(seed):
    """pred_ids with no column (M = 0): the loss is 0, as the reference's empty sum over mask.sum()."""
    pred, imgs, mask, kw = make_inputs(2, 3, 4, 2, 3, 2, torch.float32)
    empty = torch.empty(2, 0, dtype=torch.long, device=DEV)
    pred0 = pred[:, :0].detach().requires_grad_()
    loss = ops.patch_mse_loss(pred0, imgs, mask, 4, True, pred_ids=empty, backend="triton")
    assert loss.item() == 0.0 == ops.patch_mse_loss(pred0, imgs, mask, 4, True, pred_ids=empty, backend="torch").item()
    assert torch.autograd.grad(loss, pred0)[0].shape == pred0.shape


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors on the interpreter; the GPU has its own version")
def test_patch_mse_large_image_offsets(seed, tmp_path):
    """Image offsets past 2**31 elements (a row stride of 2**28 + 1024 times P = 16 rows): 64-bit
    arithmetic. The image is a strided view of a sparse file, so nothing large is allocated."""
    P, s_ih = 16, 2 ** 28 + 1024
    n = (2 * P - 1) * s_ih + P
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(n * 2)
    imgs = torch.from_file(str(path), shared=True, size=n, dtype=torch.float16).as_strided((1, 1, 2 * P, P), (n, n, s_ih, 1))
    imgs.copy_(torch.randn(1, 1, 2 * P, P).half())
    pred = torch.randn(1, 2, P * P, dtype=torch.float16)
    mask = torch.tensor([[0.0, 1.0]])
    dense = imgs.contiguous()
    assert_close(ops.patch_mse_loss(pred, imgs, mask, P, True, backend="triton"),
                 ops.patch_mse_loss(pred.float(), dense.float(), mask, P, True, backend="torch"), torch.float16)


@pytest.mark.gpu
def test_patch_mse_large_image_offsets_gpu(seed):
    """The same on the GPU: a 4.6 GB strided image whose last patch row starts past 2**31
    elements (31 rows x a stride of 1.1 * 2**26)."""
    P, s_ih = 16, int(1.1 * 2 ** 26)
    n = (2 * P - 1) * s_ih + P
    assert (2 * P - 1) * s_ih > 2 ** 31
    imgs = torch.empty(n, dtype=torch.float16, device="cuda").as_strided((1, 1, 2 * P, P), (n, n, s_ih, 1))
    imgs.copy_(torch.randn(1, 1, 2 * P, P, device="cuda").half())
    pred = torch.randn(1, 2, P * P, dtype=torch.float16, device="cuda")
    mask = torch.tensor([[0.0, 1.0]], device="cuda")
    dense = imgs.contiguous()
    assert_close(ops.patch_mse_loss(pred, imgs, mask, P, True, backend="triton"),
                 ops.patch_mse_loss(pred.float(), dense.float(), mask, P, True, backend="torch"), torch.float16)


def test_patch_mse_patch_too_large_for_one_program():
    """A patch the kernels' tile cannot hold: backend='triton' says so; 'auto' is told to decline it."""
    op = ops.patch_mse.patch_mse_loss_op
    pred, imgs, mask, _ = make_inputs(1, 5, 64, 1, 1, 0, torch.float32)
    with pytest.raises(ValueError, match="patch_size=64, channels=5; backend='torch' takes any size"):
        ops.patch_mse_loss(pred, imgs, mask, 64, True, backend="triton")
    assert "patch_size=64" in op.unsupported("triton", pred, imgs, mask, 64, True)
    assert "float32, float16 or bfloat16" in op.unsupported("triton", pred.double(), imgs, mask, 64, True)
    assert op.unsupported("triton", *make_inputs(1, 3, 16, 1, 1, 0, torch.float32)[:3], 16, True) is None


@pytest.mark.parametrize("masked_only", [False, True])
def test_patch_mse_torch_compile_fullgraph(seed, masked_only):
    pred, imgs, mask, kw = make_inputs(2, 3, 2, 2, 3, 2, torch.float32, masked_only=masked_only)

    def f(pred, imgs, mask):
        return ops.patch_mse_loss(pred, imgs, mask, 2, True, backend="triton", **kw)

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(pred, imgs, mask)
    (g,) = torch.autograd.grad(loss, pred)
    loss_r = f(pred, imgs, mask)
    (g_r,) = torch.autograd.grad(loss_r, pred)
    assert_close(loss, loss_r)
    assert_close(g, g_r)


def test_patch_mse_bad_inputs(monkeypatch):
    pred, imgs, mask, _ = make_inputs(2, 3, 4, 2, 3, 2, torch.float32)
    f = ops.patch_mse_loss
    with pytest.raises(ValueError, match="pred must have shape"):
        f(pred[..., 1:], imgs, mask, 4, False, backend="triton")
    with pytest.raises(ValueError, match="mask must have shape"):
        f(pred, imgs, mask[:, 1:], 4, False, backend="triton")
    with pytest.raises(ValueError, match="multiples of patch_size"):
        f(pred, imgs, mask, 5, False, backend="triton")
    with pytest.raises(TypeError, match="pred_ids must be int64"):
        f(pred[:, :2], imgs, mask, 4, False, pred_ids=torch.zeros(2, 2, dtype=torch.int32, device=DEV), backend="triton")
    with pytest.raises(ValueError, match="pred_ids must have shape"):
        f(pred, imgs, mask, 4, False, pred_ids=torch.zeros(2, 7, dtype=torch.long, device=DEV), backend="triton")
    with pytest.raises(TypeError, match="mask must be a float or bool"):
        f(pred, imgs, mask.long(), 4, False, backend="triton")
    with pytest.raises(TypeError, match="pred must be float32, float16 or bfloat16 for the triton backend"):
        f(pred.double(), imgs, mask, 4, False, backend="triton")
    with pytest.raises(TypeError, match="imgs must be a floating-point tensor"):
        f(pred, imgs.int(), mask, 4, False, backend="torch")
    f(pred.double(), imgs.double(), mask.double(), 4, False, backend="torch")  # float64: the reference backend
    with pytest.raises(ValueError, match="mask must be on"):
        f(pred, imgs, mask.to("meta"), 4, False, backend="triton")
    monkeypatch.setenv("MAE_FAST_CHECK_IDS", "1")
    with pytest.raises(ValueError, match=r"pred_ids must hold ids in \[0, 6\)"):
        f(pred[:, :2], imgs, mask, 4, False, pred_ids=torch.full((2, 2), 9, dtype=torch.long, device=DEV), backend="triton")


# ------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("masked_only", [False, True])
def test_patch_mse_vit_b_gpu(seed, dtype, norm, masked_only):
    pred, imgs, mask, kw = make_inputs(8, 3, 16, 14, 14, 49, dtype, device="cuda", masked_only=masked_only)
    check(pred, imgs, mask, 16, norm, kw, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_mse_vit_h_gpu(seed, dtype):
    pred, imgs, mask, kw = make_inputs(4, 3, 14, 16, 16, 64, dtype, device="cuda")
    check(pred, imgs, mask, 14, True, kw, dtype)


@pytest.mark.gpu
def test_patch_mse_deterministic_gpu(seed):
    pred, imgs, mask, kw = make_inputs(64, 3, 16, 14, 14, 49, torch.bfloat16, device="cuda")
    a = ops.patch_mse_loss(pred, imgs, mask, 16, True, backend="triton")
    for _ in range(3):
        assert torch.equal(a, ops.patch_mse_loss(pred, imgs, mask, 16, True, backend="triton"))


@pytest.mark.gpu
def test_patch_mse_inductor_gpu(seed):
    pred, imgs, mask, kw = make_inputs(4, 3, 16, 4, 4, 4, torch.float32, device="cuda")
    f = lambda *a: ops.patch_mse_loss(*a, 16, True, backend="triton")  # noqa: E731
    assert_close(torch.compile(f, fullgraph=True)(pred, imgs, mask), f(pred, imgs, mask))


def test_glue_pipeline_inductor_fullgraph(seed):
    """All three ops chained as in the model (embed -> Linear -> un-shuffle -> Linear -> loss),
    compiled with the default inductor backend and fullgraph=True: no graph break, same loss and
    gradients as eager. The custom ops stay opaque calls (the kernels run in the interpreter on CPU)."""
    N, C, P, h, w, K, D, d = 2, 3, 2, 2, 3, 2, 8, 4
    L, PPC = h * w, P * P * C
    imgs = torch.randn(N, C, h * P, w * P, device=DEV)
    ids_shuffle = torch.rand(N, L, device=DEV).argsort(1)
    ids_restore = ids_shuffle.argsort(1)
    ids_keep = ids_shuffle[:, :K]
    mask = torch.ones(N, L, device=DEV)
    mask.scatter_(1, ids_keep, 0.0)
    params = [torch.randn(D, C, P, P, device=DEV) / 4, torch.randn(D, device=DEV), torch.randn(1, 1, D, device=DEV),
              torch.randn(d, D, device=DEV) / 3, torch.randn(1, 1, d, device=DEV), torch.randn(PPC, d, device=DEV) / 2]
    for p in params:
        p.requires_grad_(True)
    pos = torch.randn(1, 1 + L, D, device=DEV)
    dpos = torch.randn(1, 1 + L, d, device=DEV)

    def f(imgs, weight, bias, cls, w1, mt, w2):
        x = ops.embed_visible_patches(imgs, ids_keep, weight, bias, pos, cls, backend="triton")
        x = ops.unshuffle_mask_tokens(x @ w1.t(), ids_restore, mt, dpos, backend="triton")
        pred = (x @ w2.t())[:, 1:]
        return ops.patch_mse_loss(pred, imgs, mask, P, True, backend="triton")

    loss = torch.compile(f, fullgraph=True)(imgs, *params)
    grads = torch.autograd.grad(loss, params)
    loss_r = f(imgs, *params)
    assert_close(loss, loss_r)
    for a, b in zip(grads, torch.autograd.grad(loss_r, params)):
        assert_close(a, b)


BODY = """
n = 0
aligned = ("pred_ptr", "img_ptr", "dpred_ptr", "s_pn", "s_pm", "s_in", "s_ic", "s_ih")
variants = [((14, 3, 4), norm, ids, weighted) for norm in (False, True) for ids in (False, True) for weighted in (False, True)]
variants += [((16, 3, 4), True, False, True), ((16, 3, 4), False, True, True), ((2, 1, 256), True, True, True)]
for i, ((P, C, R), norm, ids, weighted) in enumerate(variants):
    dt = ("fp32", "bf16", "fp16")[i % 3]
    tile = {"P": P, "C": C, "P_PAD": 1 << (P - 1).bit_length(), "C_PAD": 1 << (C - 1).bit_length(), "R": R}
    flags = {**tile, "NORM": norm, "EPS": 1e-6, "HAS_IDS": ids, "WEIGHTED": weighted}
    c(m._patch_mse_fwd_kernel, {"pred_ptr": "*" + dt, "img_ptr": "*fp32", "mask_ptr": "*i1", "ids_ptr": "*i64", "out_ptr": "*fp32"}, {**flags, "MBLOCK": 4}, num_warps=8, aligned=aligned); n += 1
    c(m._patch_mse_bwd_kernel, {"pred_ptr": "*" + dt, "img_ptr": "*" + dt, "coef_ptr": "*fp32", "ids_ptr": "*i64", "g_ptr": "*" + dt, "msum_ptr": "*fp32", "dpred_ptr": "*" + dt}, flags, num_warps=8, aligned=aligned); n += 1
for dt in ("fp32", "bf16"):
    c(m._patch_mse_finish_kernel, {"part_ptr": "*fp32", "loss_ptr": "*" + dt, "msum_ptr": "*fp32"}, {"BLOCK": 1024}); n += 1
"""


test_kernels_compile_for_sm90 = sm90_compile_test("patch_mse", BODY, 24)
