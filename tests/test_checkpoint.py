"""Checkpoint round trips, always with weights_only loading."""
import argparse
import os
import pickle

import pytest
import torch

from mae_fast import checkpoint
from test_model import tiny_model


def assert_same_weights(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        if k not in skip:
            assert torch.equal(sa[k], sb[k]), k


def official_checkpoint(model):
    """The authors' layout: weights under 'model', beside an optimizer state and pickled args."""
    return {"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
            "epoch": 799, "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_vit_base", blr=1.5e-4)}


def test_official_layout_round_trip_skips_the_pickled_namespace(tmp_path):
    src = tiny_model()
    path = tmp_path / "checkpoint-799.pth"
    torch.save(official_checkpoint(src), path)
    dst = tiny_model()
    report = checkpoint.load_pretrained(dst, path, strict=True)
    assert_same_weights(dst, src)
    assert not report.missing and not report.unexpected
    assert any("argparse.Namespace" in s for s in report.skipped)
    obj, skipped = checkpoint.read_torch_file(path)
    assert obj["args"].state == {"model": "mae_vit_base", "blr": 1.5e-4}  # plain data, no Namespace built
    assert not isinstance(obj["args"], argparse.Namespace)


def test_encoder_only_checkpoint_reports_missing_decoder(tmp_path):
    src = tiny_model()
    encoder = {k: v for k, v in src.state_dict().items()
               if not k.startswith(("decoder", "mask_token"))}
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": encoder}, path)
    dst = tiny_model()
    report = checkpoint.load_pretrained(dst, path)
    assert set(report.missing) == {k for k in src.state_dict() if k.startswith(("decoder", "mask_token"))}
    for k in encoder:
        assert torch.equal(dst.state_dict()[k], src.state_dict()[k])
    with pytest.raises(ValueError, match="strict load failed.*decoder_embed.weight"):
        checkpoint.load_pretrained(tiny_model(), path, strict=True)


def test_plain_state_dict_and_ddp_prefix(tmp_path):
    src = tiny_model()
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "sd.pt")
    dst = tiny_model()
    checkpoint.load_pretrained(dst, tmp_path / "sd.pt", strict=True)
    assert_same_weights(dst, src)


def test_safetensors_save_load_and_convert(tmp_path):
    pytest.importorskip("safetensors")
    src = tiny_model()
    checkpoint.save_safetensors(src, tmp_path / "m.safetensors")
    dst = tiny_model()
    checkpoint.load_pretrained(dst, tmp_path / "m.safetensors", strict=True)
    assert_same_weights(dst, src)
    torch.save(official_checkpoint(src), tmp_path / "official.pth")
    skipped = checkpoint.convert_to_safetensors(tmp_path / "official.pth", tmp_path / "c.safetensors")
    assert any("Namespace" in s for s in skipped)
    dst = tiny_model()
    checkpoint.load_pretrained(dst, tmp_path / "c.safetensors", strict=True)
    assert_same_weights(dst, src)


def test_other_img_size_regenerates_fixed_tables(tmp_path):
    src = tiny_model(img_size=48)  # 6x6 grid
    torch.save({"model": src.state_dict()}, tmp_path / "m.pth")
    dst = tiny_model()  # 4x4 grid
    report = checkpoint.load_pretrained(dst, tmp_path / "m.pth", strict=True)
    assert report.regenerated == ["pos_embed", "decoder_pos_embed"]
    assert torch.equal(dst.pos_embed, tiny_model().pos_embed)
    assert_same_weights(dst, src, skip={"pos_embed", "decoder_pos_embed"})


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    state = tiny_model().state_dict()
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 32)
    with pytest.raises(ValueError, match=r"'blocks.0.mlp.fc1.weight' has shape \(7, 32\).*\(128, 32\)"):
        checkpoint.load_pretrained(tiny_model(), state)


class Exploit:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    torch.save({"model": tiny_model().state_dict(), "payload": Exploit(marker)}, path)
    with pytest.raises(ValueError, match="system.*could run arbitrary code"):
        checkpoint.load_pretrained(tiny_model(), path)
    with open(tmp_path / "evil.pkl", "wb") as f:  # a bare pickle, not a torch zip file
        pickle.dump(Exploit(marker), f)
    with pytest.raises(Exception):
        checkpoint.load_pretrained(tiny_model(), tmp_path / "evil.pkl")
    assert not marker.exists()
