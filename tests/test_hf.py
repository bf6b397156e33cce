"""Our weights in HuggingFace's ViTMAEForPreTraining compute the same numbers, both namings."""
import json

import pytest
import torch

from mae_fast import checkpoint, hf
from conftest import tol
from test_model import tiny_model


def test_round_trip_both_schemes():
    state = tiny_model().state_dict()
    for scheme in hf.SCHEMES:
        hf_state = hf.to_hf(state, scheme)
        assert hf.detect_scheme(hf_state) == scheme
        back = hf.from_hf(hf_state)
        assert list(back) != [] and set(back) == set(state)
        for k in state:
            assert torch.equal(back[k], state[k]), k
    v4 = hf.to_hf(state, "v4")
    assert "vit.encoder.layer.1.attention.attention.query.weight" in v4
    assert "decoder.decoder_layers.0.intermediate.dense.bias" in v4
    with pytest.raises(ValueError, match="no place in MAE"):
        hf.from_hf({**v4, "vit.pooler.dense.weight": torch.zeros(1)})


def test_hf_model_with_our_weights_matches(seed):
    transformers = pytest.importorskip("transformers")
    ours = tiny_model(norm_pix_loss=True, backend="torch")
    config = transformers.ViTMAEConfig(**hf.hf_config_kwargs(ours), mask_ratio=0.75)
    peer = transformers.ViTMAEForPreTraining(config).eval()
    scheme = hf.detect_scheme(peer.state_dict())
    peer.load_state_dict(hf.to_hf(ours.state_dict(), scheme), strict=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss, pred, mask = ours(imgs, noise=noise)
    out = peer(pixel_values=imgs, noise=noise)
    torch.testing.assert_close(out.mask, mask)
    torch.testing.assert_close(out.logits, pred, **tol(torch.float32))
    torch.testing.assert_close(out.loss, loss, **tol(torch.float32))


def test_load_hf_folder_and_hf_keys_in_load_pretrained(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    src = tiny_model()
    save_file({k: v.contiguous() for k, v in hf.to_hf(src.state_dict(), "v4").items()},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit_mae", **hf.hf_config_kwargs(src)}))
    model = hf.load_hf_folder(tmp_path)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    dst = tiny_model()
    report = checkpoint.load_pretrained(dst, tmp_path / "model.safetensors", strict=True)
    assert "HuggingFace" in " ".join(report.skipped)
