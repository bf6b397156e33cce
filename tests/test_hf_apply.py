"""mae_fast.hf.apply_to_vit: our attention and fused block ops inside HuggingFace ViT / ViTMAE
models, in place, with HF's own outputs and gradients."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from mae_fast import hf  # noqa: E402

KW = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
          patch_size=8, layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _models():
    torch.manual_seed(0)
    cls = transformers.ViTForImageClassification(transformers.ViTConfig(**KW, num_labels=5))
    mae = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
        **KW, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=32, mask_ratio=0.75))
    return {"ViTForImageClassification": cls, "ViTModel": transformers.ViTModel(transformers.ViTConfig(**KW)),
            "ViTMAEForPreTraining": mae}


def _run(name, model, x):
    if name == "ViTMAEForPreTraining":
        noise = torch.rand(x.shape[0], 16, generator=torch.Generator().manual_seed(1))
        out = model(pixel_values=x, noise=noise)
        return out.loss, out.logits
    out = model(pixel_values=x)
    y = out.logits if name == "ViTForImageClassification" else out.last_hidden_state
    return y.square().mean(), y


@pytest.mark.parametrize("name", ["ViTForImageClassification", "ViTModel", "ViTMAEForPreTraining"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_outputs_and_gradients_equal_hfs_own(name, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    model = _models()[name].train()
    x = torch.randn(2, 3, 32, 32)
    loss, y = _run(name, model, x)
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    keys = list(model.state_dict())
    model.zero_grad()
    assert hf.apply_to_vit(model, backend=backend) is model
    assert list(model.state_dict()) == keys  # in place: same modules, parameters and keys
    loss2, y2 = _run(name, model, x)
    loss2.backward()
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)
    for n, g in ref.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-6, msg=n)


def test_fused_layers_run_and_uncovered_calls_fall_back(monkeypatch):
    model = hf.apply_to_vit(_models()["ViTModel"].eval(), backend="torch")
    calls = []
    from mae_fast import ops

    real = ops.add_layer_norm
    monkeypatch.setattr(ops, "add_layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    model(pixel_values=torch.randn(1, 3, 32, 32))
    assert len(calls) == 2  # one per layer: the fused path ran
    layer = model.layers[0] if hasattr(model, "layers") else model.encoder.layer[0]
    x = torch.randn(1, 17, 32)
    torch.testing.assert_close(layer(x, torch.zeros(1, 1, 17, 17)), layer._mae_fast_original_forward(x))
    with pytest.raises(ValueError, match="nothing to apply"):
        hf.apply_to_vit(torch.nn.Linear(2, 2))
