"""The drop-in contract of ../shared/SPEC.md, checked on the torch backend."""
from functools import partial

import pytest
import torch
import torch.nn as nn

import mae_fast
from mae_fast import models_mae
from mae_fast.ops import BackendUnavailableError

import spec_reference
from conftest import MODEL_TOLERANCES, tol

FACTORIES = {
    # name: (alias, D, depth, heads, P)
    "mae_vit_base_patch16_dec512d8b": ("mae_vit_base_patch16", 768, 12, 12, 16),
    "mae_vit_large_patch16_dec512d8b": ("mae_vit_large_patch16", 1024, 24, 16, 16),
    "mae_vit_huge_patch14_dec512d8b": ("mae_vit_huge_patch14", 1280, 32, 16, 14),
}
BLOCK_KEYS = [  # (suffix, shape as a function of the width)
    ("norm1.weight", lambda c: (c,)), ("norm1.bias", lambda c: (c,)),
    ("attn.qkv.weight", lambda c: (3 * c, c)), ("attn.qkv.bias", lambda c: (3 * c,)),
    ("attn.proj.weight", lambda c: (c, c)), ("attn.proj.bias", lambda c: (c,)),
    ("norm2.weight", lambda c: (c,)), ("norm2.bias", lambda c: (c,)),
    ("mlp.fc1.weight", lambda c: (4 * c, c)), ("mlp.fc1.bias", lambda c: (4 * c,)),
    ("mlp.fc2.weight", lambda c: (c, 4 * c)), ("mlp.fc2.bias", lambda c: (c,)),
]


def expected_state_dict(D, depth, P, d=512, decoder_depth=8, img=224, C=3):
    L = (img // P) ** 2
    keys = [("cls_token", (1, 1, D)), ("pos_embed", (1, L + 1, D)), ("mask_token", (1, 1, d)),
            ("decoder_pos_embed", (1, L + 1, d)),
            ("patch_embed.proj.weight", (D, C, P, P)), ("patch_embed.proj.bias", (D,))]
    keys += [(f"blocks.{i}.{k}", f(D)) for i in range(depth) for k, f in BLOCK_KEYS]
    keys += [("norm.weight", (D,)), ("norm.bias", (D,)),
             ("decoder_embed.weight", (d, D)), ("decoder_embed.bias", (d,))]
    keys += [(f"decoder_blocks.{i}.{k}", f(d)) for i in range(decoder_depth) for k, f in BLOCK_KEYS]
    keys += [("decoder_norm.weight", (d,)), ("decoder_norm.bias", (d,)),
             ("decoder_pred.weight", (P * P * C, d)), ("decoder_pred.bias", (P * P * C,))]
    return keys


@pytest.mark.parametrize("name", FACTORIES)
def test_state_dict_keys_shapes_and_order(name):
    alias, D, depth, heads, P = FACTORIES[name]
    with torch.device("meta"):
        model = getattr(models_mae, name)()
        model_alias = getattr(mae_fast, alias)()
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected_state_dict(D, depth, P)
    assert [k for k, _ in model_alias.state_dict().items()] == [k for k, _ in got]
    # parameters (what an optimizer state is matched to, by position) in the same order
    assert [k for k, _ in model.named_parameters()] == [k for k, _ in got]
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert model.blocks[0].norm1.eps == 1e-6 and model.blocks[0].attn.num_heads == heads
    assert model.decoder_blocks[0].attn.num_heads == 16


def test_vit_base_parameter_counts():
    with torch.device("meta"):
        model = mae_fast.mae_vit_base_patch16()
    assert len(model.state_dict()) == 254
    assert sum(p.numel() for p in model.parameters()) == 111_907_840
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 111_655_680


def test_initialisation():
    torch.manual_seed(0)
    model = mae_fast.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                          decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    L, D = 16, 32
    pe = model.pos_embed[0].double()
    assert torch.all(pe[0] == 0)
    # first half of channels: the column index; second half: the row index
    col, row = 1, 0
    w = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D / 4))
    ref = torch.cat([torch.sin(col * w), torch.cos(col * w), torch.sin(row * w), torch.cos(row * w)])
    torch.testing.assert_close(pe[1 + 0 * 4 + 1], ref.float().double())
    assert model.decoder_pos_embed.shape == (1, L + 1, 16)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)
            bound = (6 / (m.in_features + m.out_features)) ** 0.5
            assert m.weight.abs().max() <= bound
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    wp = model.patch_embed.proj.weight
    bound = (6 / (32 + 3 * 64)) ** 0.5  # xavier-uniform as a (D, C*P*P) Linear
    assert wp.abs().max() <= bound
    # the Conv2d default (bound 1/sqrt(192)) would also pass the line above: check the spread too
    assert abs(wp.std().item() - bound / 3 ** 0.5) < 0.05 * bound / 3 ** 0.5
    assert 0.005 < model.cls_token.std() < 0.05


TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
            decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=3, mlp_ratio=4.0)


def tiny_model(**kw):
    cfg = {**TINY, "norm_layer": partial(nn.LayerNorm, eps=1e-6), **kw}
    return mae_fast.MaskedAutoencoderViT(**cfg)


def spec_forward(model, imgs, noise, mask_ratio, norm_pix_loss):
    params = {k: v.detach().double().requires_grad_(True) for k, v in model.state_dict().items()}
    loss, pred, mask = spec_reference.forward(
        params, imgs.double(), noise, patch_size=TINY["patch_size"], heads=TINY["num_heads"],
        decoder_heads=TINY["decoder_num_heads"], depth=TINY["depth"], decoder_depth=TINY["decoder_depth"],
        mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss)
    loss.backward()
    return loss, pred, mask, {k: v.grad for k, v in params.items()}


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_float64_spec_forward_and_grads(seed, norm_pix_loss, mask_ratio, dtype):
    model = tiny_model(norm_pix_loss=norm_pix_loss, backend="torch")
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    ref_loss, ref_pred, ref_mask, ref_grads = spec_forward(model, imgs, noise, mask_ratio, norm_pix_loss)

    model = model.to(dtype)
    loss, pred, mask = model(imgs.to(dtype), mask_ratio=mask_ratio, noise=noise)
    loss.backward()
    rule = tol(dtype, MODEL_TOLERANCES)
    torch.testing.assert_close(mask.double(), ref_mask)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), **rule)
    torch.testing.assert_close(pred.double(), ref_pred.detach(), **rule)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.double(), ref_grads[name], **rule, msg=name)
        else:
            assert p.grad is None


def test_mask_ratio_zero_and_scalar_types_work_where_the_reference_takes_them():
    """No patch removed is fine for the encoder (features); numpy / tensor scalars are ratios too."""
    import numpy as np

    model = tiny_model(backend="torch")
    imgs = torch.randn(2, 3, 32, 32)
    latent, mask, _ = model.forward_encoder(imgs, 0.0)
    assert latent.shape == (2, 17, 32) and mask.sum() == 0
    for ratio in (np.float32(0.75), torch.tensor(0.75), 3 / 4):
        _, _, mask = model(imgs, mask_ratio=ratio)
        assert torch.all(mask.sum(1) == 12)


def test_same_seed_gives_the_reference_mask():
    model = tiny_model(backend="torch")
    imgs = torch.randn(4, 3, 32, 32)
    torch.manual_seed(123)
    _, _, mask = model(imgs)
    torch.manual_seed(123)
    noise = torch.rand(4, 16)  # the reference's first draw: torch.rand(N, L)
    _, _, ref_mask = spec_reference.mask_from_noise(noise, 0.75)
    assert torch.equal(mask.double(), ref_mask)
    assert mask.dtype == torch.float32 and mask.shape == (4, 16)
    assert torch.all(mask.sum(1) == 12)


def test_noise_argument_gives_its_mask():
    model = tiny_model(backend="torch")
    noise = torch.rand(2, 16)
    noise[0, :4] = -1.0  # the smallest noise is kept
    _, _, mask = model(torch.randn(2, 3, 32, 32), noise=noise)
    assert torch.all(mask[0, :4] == 0) and torch.all(mask[0, 4:] == 1)
    _, _, ref_mask = spec_reference.mask_from_noise(noise, 0.75)
    assert torch.equal(mask.double(), ref_mask)


def test_random_masking_and_methods_keep_reference_signatures():
    model = tiny_model(backend="torch")
    x = torch.randn(2, 16, 5)
    x_masked, mask, ids_restore = model.random_masking(x, 0.75)
    assert x_masked.shape == (2, 4, 5) and mask.shape == (2, 16) and ids_restore.shape == (2, 16)
    kept = (mask == 0)
    for n in range(2):
        assert set(x_masked[n].sum(-1).tolist()) == set(x[n][kept[n]].sum(-1).tolist())
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75)
    assert latent.shape == (2, 5, 32)
    pred = model.forward_decoder(latent, ids_restore)
    assert pred.shape == (2, 16, 8 * 8 * 3)
    assert model.forward_loss(imgs, pred, mask).dim() == 0


def test_in_chans_is_honoured():
    model = tiny_model(in_chans=1, backend="torch")
    imgs = torch.randn(2, 1, 32, 32)
    loss, pred, mask = model(imgs)
    assert pred.shape == (2, 16, 64) and torch.isfinite(loss)
    assert model.patchify(imgs).shape == (2, 16, 64)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)


def test_encoder_mask_tokens_ablation():
    model = tiny_model(encoder_mask_tokens=True, backend="torch")
    keys = list(model.state_dict())
    assert keys == [k for k, _ in expected_state_dict(32, 2, 8, d=24, decoder_depth=2, img=32)][:4] + \
        ["encoder_mask_token"] + keys[5:]
    assert len(keys) == len(tiny_model().state_dict()) + 1
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    latent, mask, _ = model.forward_encoder(imgs, 0.75, noise)
    assert latent.shape == (2, 17, 32)  # every patch goes through the encoder
    loss, pred, mask = model(imgs, noise=noise)
    loss.backward()
    assert model.encoder_mask_token.grad is not None and model.encoder_mask_token.grad.abs().sum() > 0
    assert model.mask_token.grad is None  # the decoder gets no mask tokens of its own
    # a removed patch's pixels cannot reach the encoder: changing them leaves pred unchanged
    imgs2 = imgs.clone()
    removed = mask[0].nonzero()[0].item()
    r, c = divmod(removed, 4)
    imgs2[0, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 1.0
    _, pred2, _ = model(imgs2, noise=noise)
    torch.testing.assert_close(pred2, pred)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("imgs, exc, words", [
    (torch.randn(3, 32, 32), ValueError, "4-D"),
    (torch.randn(1, 4, 32, 32), ValueError, "in_chans=3"),
    (torch.randn(1, 3, 64, 64), ValueError, "img_size"),
    (torch.randn(1, 3, 30, 30), ValueError, "not divisible by patch_size"),
    (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError, "floating-point"),
    ([[1.0]], TypeError, "torch.Tensor"),
])
def test_bad_images_are_rejected(imgs, exc, words):
    with pytest.raises(exc, match=words):
        tiny_model()(imgs)


@pytest.mark.parametrize("ratio, exc, words", [
    (1.0, ValueError, r"\[0, 1\)"),
    (-0.1, ValueError, r"\[0, 1\)"),
    (0.0, ValueError, "removes no patch.*NaN"),
    (0.99, ValueError, "keeps no patch"),
    ("0.75", TypeError, "mask_ratio"),
])
def test_bad_mask_ratio_is_rejected(ratio, exc, words):
    with pytest.raises(exc, match=words):
        tiny_model()(torch.randn(1, 3, 32, 32), mask_ratio=ratio)


@pytest.mark.parametrize("noise, exc, words", [
    (torch.rand(2, 15), ValueError, r"\(N, L\) = \(2, 16\)"),
    (torch.rand(16), ValueError, "shape"),
    (torch.randint(0, 9, (2, 16)), TypeError, "floating-point"),
    (torch.rand(2, 16, device="meta"), ValueError, "device"),
])
def test_bad_noise_is_rejected(noise, exc, words):
    with pytest.raises(exc, match=words):
        tiny_model()(torch.randn(2, 3, 32, 32), noise=noise)


# ------------------------------------------------------------------ the backend switch
def test_backend_switch_validates_and_follows_precedence(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        tiny_model(backend="tpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        with mae_fast.use_backend("fast"):
            pass
    monkeypatch.setenv(mae_fast.ops.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="MAE_FAST_BACKEND"):
        mae_fast.ops.requested_backend()
    monkeypatch.setenv(mae_fast.ops.ENV_VAR, "torch")
    assert mae_fast.ops.requested_backend() == "torch"
    with mae_fast.use_backend("cuda"):
        assert mae_fast.ops.requested_backend() == "cuda"
        assert mae_fast.ops.requested_backend("torch") == "torch"  # explicit beats the scope
    monkeypatch.delenv(mae_fast.ops.ENV_VAR)
    assert mae_fast.ops.requested_backend() == "auto"


def test_auto_on_cpu_is_the_reference():
    model = tiny_model(backend="torch")
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    ref = model(imgs, noise=noise)
    model.backend = "auto"
    out = model(imgs, noise=noise)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


def test_unavailable_backend_is_a_clear_error():
    """The CUDA kernels cannot run on the meta device whatever is built: an explicit request
    errors, naming the backend and the op, rather than falling back silently."""
    qkv = torch.randn(1, 4, 3, 2, 8, device="meta")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        mae_fast.ops.attention(qkv, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="triton"):
        mae_fast.ops.unshuffle_mask_tokens(torch.randn(1, 2, 4, device="meta"),
                                           torch.zeros(1, 3, dtype=torch.long, device="meta"),
                                           torch.randn(1, 1, 4, device="meta"),
                                           torch.randn(1, 4, 4, device="meta"), backend="triton")


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_pred_masked_only_gives_the_same_loss_and_grads(seed, norm_pix_loss):
    full = tiny_model(norm_pix_loss=norm_pix_loss, backend="torch")
    part = tiny_model(norm_pix_loss=norm_pix_loss, backend="torch", pred_masked_only=True)
    part.load_state_dict(full.state_dict())
    assert list(part.state_dict()) == list(full.state_dict())  # no new keys
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    loss, pred, mask = full(imgs, noise=noise)
    loss_p, pred_p, mask_p = part(imgs, noise=noise)
    removed = noise.argsort(1)[:, 4:]  # the removed patches, in argsort(noise) order
    assert pred_p.shape == (3, 12, 192) and torch.equal(mask_p, mask)
    torch.testing.assert_close(pred_p, torch.gather(pred, 1, removed[..., None].expand(-1, -1, 192)))
    torch.testing.assert_close(loss_p, loss)
    loss.backward()
    loss_p.backward()
    for (name, a), b in zip(full.named_parameters(), part.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_hooks_and_swapped_patch_embed_are_honoured():
    """The fused embedding reads proj's weights directly; with a hook on patch_embed, or another
    proj module, the model calls patch_embed as the reference does, with the same numbers."""
    model = tiny_model(backend="torch")
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    ref = model(imgs, noise=noise)
    seen = []
    handle = model.patch_embed.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    out = model(imgs, noise=noise)
    handle.remove()
    assert seen == [(2, 16, 32)]
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])

    class Scaled(nn.Conv2d):  # e.g. a LoRA-style wrapper: not a plain Conv2d
        def forward(self, x):
            return 2 * super().forward(x)

    conv = model.patch_embed.proj
    model.patch_embed.proj = Scaled(3, 32, 8, 8)
    model.patch_embed.proj.load_state_dict(conv.state_dict())
    assert not model.plain_patch_embed()
    latent, _, _ = model.forward_encoder(imgs, 0.75, noise)
    model.patch_embed.proj = conv
    plain, _, _ = model.forward_encoder(imgs, 0.75, noise)
    assert not torch.allclose(latent, plain)  # the wrapper's forward ran
