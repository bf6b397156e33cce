"""The model on the fast backends computes what it computes on the torch reference."""
import pytest
import torch

from mae_fast import models_mae, ops
from conftest import FLASH_RULE_FLOOR, NORM_FLOOR, tol
from test_model import tiny_model

pytestmark = pytest.mark.skipif(ops.why_not_triton(torch.device("cpu")) is not None and not torch.cuda.is_available(),
                                reason="triton cannot run here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(model, imgs, noise):
    loss, pred, mask = model(imgs, noise=noise)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), pred.detach(), mask, grads


def assert_same_step(a, b, dtype=torch.float32):
    for x, y, what in zip(a[:3], b[:3], ("loss", "pred", "mask")):
        torch.testing.assert_close(x.float(), y.float(), **tol(dtype), msg=what)
    assert set(a[3]) == set(b[3])
    for name in a[3]:
        torch.testing.assert_close(a[3][name].float(), b[3][name].float(), **tol(dtype), msg=name)


@pytest.mark.parametrize("kw", [{}, {"norm_pix_loss": True}, {"pred_masked_only": True, "norm_pix_loss": True}])
def test_triton_backend_equals_torch_on_a_tiny_model(seed, kw):
    model = tiny_model(backend="torch", **kw).to(DEVICE)
    imgs, noise = torch.randn(2, 3, 32, 32, device=DEVICE), torch.rand(2, 16, device=DEVICE)
    ref = run(model, imgs, noise)
    model.backend = "triton"
    assert_same_step(run(model, imgs, noise), ref)


@pytest.fixture
def no_tf32():
    """The fp32 reference must be fp32: TF32 convs/matmuls would differ from our kernels by ~1e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def assert_as_close_as_reference(fast, ref, exact, what="", floor=FLASH_RULE_FLOOR[torch.float32]):
    """``fast`` is within 2x the reference's own error (both against ``exact``), plus a floor:
    flash-attention's rule, for paths that sum in another order than the reference."""
    for i, name in ((0, "loss"), (1, "pred")):
        err_ref = (ref[i].double() - exact[i]).abs().max().item()
        err_fast = (fast[i].double() - exact[i]).abs().max().item()
        assert err_fast <= 2 * err_ref + floor * exact[i].abs().max().item(), (what, name, err_fast, err_ref)
    assert torch.equal(fast[2], ref[2])
    for name in exact[3]:
        err_ref = (ref[3][name].double() - exact[3][name]).norm().item()
        err_fast = (fast[3][name].double() - exact[3][name]).norm().item()
        assert err_fast <= 2 * err_ref + floor * exact[3][name].norm().item() + NORM_FLOOR, (what, name, err_fast, err_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_vit_base_fp32_equals_torch(seed, no_tf32, backend):
    """fp32: auto runs the Triton glue and (the CUDA kernels taking half types only) SDPA attention.
    Judged against the float64 model, as close as the fp32 torch backend is."""
    model = models_mae.mae_vit_base_patch16(backend="torch").cuda()
    imgs, noise = torch.randn(4, 3, 224, 224, device="cuda"), torch.rand(4, 196, device="cuda")
    exact = run(model.double(), imgs.double(), noise)
    model.float()
    ref = run(model, imgs, noise)
    model.backend = backend
    assert_as_close_as_reference(run(model, imgs, noise), ref, exact, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "auto"])
def test_vit_base_bf16_autocast_close_to_torch(seed, backend):
    """bf16 autocast: the fast backends stay as close to the fp32 reference as the torch backend
    under the same autocast does (2x its error, plus a floor, as flash-attention's tests judge)."""
    model = models_mae.mae_vit_base_patch16(backend="torch").cuda()
    imgs, noise = torch.randn(4, 3, 224, 224, device="cuda"), torch.rand(4, 196, device="cuda")
    exact = run(model.double(), imgs.double(), noise)
    model.float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = run(model, imgs, noise)
        model.backend = backend
        fast = run(model, imgs, noise)
    assert_as_close_as_reference(fast, ref, exact, backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_model_compiles_fullgraph(seed, backend):
    """torch.compile(fullgraph=True) traces the whole model on every backend: the backend switch,
    the custom ops' fake kernels and their autograd leave no graph break (aot_eager keeps it quick;
    the ops' own tests cover inductor)."""
    if backend == "cuda" and DEVICE == "cuda":
        pytest.skip("the CUDA kernels take fp16/bf16 only; their compile test is in test_attention.py")
    model = tiny_model(backend=backend).to(DEVICE)
    imgs, noise = torch.randn(2, 3, 32, 32, device=DEVICE), torch.rand(2, 16, device=DEVICE)
    ref = run(model, imgs, noise)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss, pred, mask = compiled(imgs, noise=noise)
    loss.backward()
    got = (loss.detach(), pred.detach(), mask, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert_same_step(got, ref)


def test_fused_blocks_are_used_and_step_aside(seed, monkeypatch):
    """The triton backend runs the blocks fused (add_layer_norm calls, the norm modules never
    called); a hook on any block module, or the torch backend, runs them block by block so the hook
    sees its calls. Every path computes the same step; the state_dict is the reference's."""
    from mae_fast import layers

    fused_calls = []
    real = layers.ops.add_layer_norm
    monkeypatch.setattr(layers.ops, "add_layer_norm", lambda *a, **k: fused_calls.append(1) or real(*a, **k))
    model = tiny_model(backend="torch").to(DEVICE)
    imgs, noise = torch.randn(2, 3, 32, 32, device=DEVICE), torch.rand(2, 16, device=DEVICE)
    ref = run(model, imgs, noise)
    assert not fused_calls
    model.backend = "triton"
    assert_same_step(run(model, imgs, noise), ref)
    assert len(fused_calls) == 2 * (len(model.blocks) + len(model.decoder_blocks))
    seen = []
    model.decoder_blocks[0].mlp.act.register_forward_hook(lambda *a: seen.append(1))
    fused_calls.clear()
    assert_same_step(run(model, imgs, noise), ref)
    assert seen and len(fused_calls) == 2 * len(model.blocks), "the hooked decoder runs block by block"
    assert list(model.state_dict()) == list(tiny_model().state_dict())


def test_fused_blocks_autocast_bf16(seed):
    """bf16 autocast: the fused blocks stay as close to the fp32 reference as the reference blocks
    under the same autocast, judged against float64."""
    model = tiny_model(backend="torch").to(DEVICE)
    imgs, noise = torch.randn(2, 3, 32, 32, device=DEVICE), torch.rand(2, 16, device=DEVICE)
    exact = run(model.double(), imgs.double(), noise)
    model.float()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ref = run(model, imgs, noise)
        model.backend = "triton"
        fast = run(model, imgs, noise)
    assert fast[1].dtype == ref[1].dtype
    assert_as_close_as_reference(fast, ref, exact, "bf16", floor=FLASH_RULE_FLOOR[torch.bfloat16])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_blocks_reuses_one_graph_per_block_shape(seed, backend):
    """Regional compilation: the blocks of a stack share their compiled code (a recompile per
    block would make compile time grow with depth), and the step is the eager one."""
    model = tiny_model(backend=backend, depth=3, decoder_depth=3).to(DEVICE)
    imgs, noise = torch.randn(2, 3, 32, 32, device=DEVICE), torch.rand(2, 16, device=DEVICE)
    ref = run(model, imgs, noise)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.compile_blocks(backend="aot_eager")
    assert_same_step(run(model, imgs, noise), ref)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < frames <= 4, f"{frames} graphs for 6 blocks of two shapes"


def test_fused_blocks_with_stochastic_depth(seed):
    """Drop path in training mode: the fused blocks draw the same per-sample masks, in the same
    order, as the reference blocks (attention branch first, blocks in order), so the same seed
    gives the same step; in eval mode nothing is drawn."""
    from mae_fast.layers import Block

    blocks = torch.nn.ModuleList([Block(32, 4, qkv_bias=True, drop_path=p) for p in (0.0, 0.3, 0.5)]).to(DEVICE)
    norm = torch.nn.LayerNorm(32, eps=1e-6).to(DEVICE)
    x = torch.randn(6, 9, 32, device=DEVICE, requires_grad=True)
    # A random output gradient: the sum of a unit LayerNorm's squared outputs is ~constant, so its
    # gradients would be rounding noise (~1e-5), which no elementwise tolerance can judge.
    grad_out = torch.randn(6, 9, 32, device=DEVICE)
    from mae_fast.layers import forward_blocks

    def step(backend):
        for blk in blocks:
            blk.attn.backend = backend
        torch.manual_seed(7)
        out = forward_blocks(blocks, x, norm)
        grads = torch.autograd.grad(out, [x, *blocks.parameters()], grad_out)
        return out, grads, torch.rand(1)  # the RNG state after the step: as many draws
    ref, fused = step("torch"), step("triton")
    torch.testing.assert_close(fused[0], ref[0], **tol(torch.float32))
    assert torch.equal(fused[2], ref[2])
    for a, b in zip(fused[1], ref[1]):
        torch.testing.assert_close(a, b, **tol(torch.float32))
    blocks.eval()  # nothing dropped: another output, and no draw
    evald = step("triton")
    torch.manual_seed(7)
    no_draws = torch.rand(1)
    assert not torch.allclose(evald[0], ref[0]) and torch.equal(evald[2], no_draws)
