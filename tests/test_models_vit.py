"""mae_fast.models_vit against an independent implementation of ../shared/SPEC_VIT.md."""
from functools import partial

import pytest
import torch
import torch.nn as nn

import spec_vit_reference as spec
from conftest import MODEL_TOLERANCES, tol
from mae_fast import models_mae, models_vit, ops

TINY = dict(img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=32, depth=3, num_heads=4)


def tiny_vit(**kw):
    cfg = {**TINY, "mlp_ratio": 4, "qkv_bias": True, "norm_layer": partial(nn.LayerNorm, eps=1e-6), **kw}
    return models_vit.VisionTransformer(**cfg)


@pytest.mark.parametrize("global_pool", [False, True])
def test_same_seed_same_weights_and_keys(global_pool):
    torch.manual_seed(3)
    ours = tiny_vit(global_pool=global_pool).state_dict()
    torch.manual_seed(3)
    ref = spec.init_params(img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=32, depth=3,
                           global_pool=global_pool)
    assert list(ours) == list(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


def test_parameter_counts_of_the_factories():
    with torch.device("meta"):
        b = models_vit.vit_base_patch16(global_pool=True)
        large = models_vit.vit_large_patch16()
    assert sum(p.numel() for p in b.parameters()) == 86_567_656
    assert sum(p.numel() for p in large.parameters()) == 304_326_632
    assert spec.n_params(768, 12, 196, 3, 16, 1000) == 86_567_656
    assert b.no_weight_decay() == {"pos_embed", "cls_token"}
    assert not hasattr(b, "norm") and hasattr(large, "norm") and not hasattr(large, "fc_norm")


@pytest.mark.parametrize("global_pool", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_and_grads_match_the_spec(seed, global_pool, training, backend):
    """fp32 logits and every gradient against the float64 spec from the same weights; in training
    mode with stochastic depth both draw the same per-sample masks from the same seed."""
    if backend == "triton" and ops.why_not_triton(torch.device("cpu")) is not None:
        pytest.skip("triton cannot run here")
    rate = 0.4 if training else 0.0
    model = tiny_vit(global_pool=global_pool, drop_path_rate=rate, backend=backend).train(training)
    imgs = torch.randn(6, 3, 32, 32)
    p = {k: v.detach().double().requires_grad_() for k, v in model.state_dict().items()}
    torch.manual_seed(11)
    ref = spec.forward(p, imgs.double(), patch_size=8, heads=4, depth=3, drop_path_rate=rate, training=training,
                       global_pool=global_pool)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, list(p.values()), g)
    torch.manual_seed(11)
    out = model(imgs)
    out.backward(g.float())
    rule = tol(torch.float32, MODEL_TOLERANCES)
    torch.testing.assert_close(out.double(), ref.detach(), **rule)
    named = dict(model.named_parameters())
    for k, e in zip(p, ref_grads):
        torch.testing.assert_close(named[k].grad.double(), e, **rule, msg=k)


def test_loads_an_mae_checkpoint_as_the_authors_finetuning(tmp_path):
    """An MAE checkpoint at 32 px into a 48 px ViT: pos_embed interpolated, missing keys exactly
    the head (and fc_norm with global pooling), the head drawn with std 2e-5."""
    mae = models_mae.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4,
                                          decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                          norm_layer=partial(nn.LayerNorm, eps=1e-6))
    path = tmp_path / "checkpoint-1.pth"
    torch.save({"model": mae.state_dict(), "epoch": 1}, path)
    for global_pool in (True, False):
        vit = tiny_vit(img_size=48, global_pool=global_pool)
        msg = models_vit.load_mae_checkpoint(vit, path)
        assert "mask_token" in msg.unexpected_keys and "decoder_pred.weight" in msg.unexpected_keys
        assert ("norm.weight" in msg.unexpected_keys) == global_pool
        assert torch.equal(vit.blocks[2].mlp.fc2.weight, mae.blocks[2].mlp.fc2.weight)
        assert vit.pos_embed.shape == (1, 37, 32)
        assert torch.equal(vit.pos_embed[0, 0], mae.pos_embed[0, 0])  # the cls row is kept
        grid = mae.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
        want = nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
        torch.testing.assert_close(vit.pos_embed[:, 1:], want.permute(0, 2, 3, 1).flatten(1, 2))
        assert 1e-5 < vit.head.weight.std() < 4e-5  # std 2e-5 (timm's bounds are +-2, absolute)
    with pytest.raises(ValueError, match="missing"):
        models_vit.load_mae_checkpoint(tiny_vit(embed_dim=32, depth=4), path)


def test_refuses_what_it_does_not_run():
    with pytest.raises(ValueError, match="drop_rate must be 0"):
        tiny_vit(drop_rate=0.1)
    with pytest.raises(ValueError, match="attn_drop_rate must be 0"):
        tiny_vit(attn_drop_rate=0.1)
    with pytest.raises(ValueError, match="hybrid_backbone"):
        tiny_vit(hybrid_backbone=nn.Identity())
    with pytest.raises(ValueError, match="qk_scale"):
        tiny_vit(qk_scale=0.1)
    tiny_vit(qk_scale=8 ** -0.5)
    with pytest.raises(ValueError, match="imgs must be 32x32"):
        tiny_vit()(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="unknown model"):
        models_vit.create_model("vit_gigantic")
