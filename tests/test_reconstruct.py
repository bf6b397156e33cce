"""Reconstruction PNGs from our checkpoints and the authors' layouts."""
import argparse

import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from mae_fast import data, models_mae, pretrain, reconstruct  # noqa: E402

NAME = pretrain.DEMO_MODEL


def tiny(norm_pix_loss=False):
    torch.manual_seed(0)
    return models_mae.create_model(NAME, img_size=32, norm_pix_loss=norm_pix_loss)


@pytest.fixture
def image(tmp_path):
    return data.save_demo_images(tmp_path / "imgs", 1, size=50)[0]


def run(*argv):
    return reconstruct.main(reconstruct.build_parser().parse_args([str(a) for a in argv]))


def test_our_checkpoint_to_png_grid(tmp_path, image):
    model = tiny(norm_pix_loss=True)
    ckpt = tmp_path / "checkpoint-0.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 0, "scaler": {},
                "args": {"model": NAME, "input_size": 32, "norm_pix_loss": True}}, ckpt)
    assert run("--checkpoint", ckpt, image, "--out-dir", tmp_path / "out", "--scale", 2) == 0
    png = Image.open(tmp_path / "out" / "demo_000_mae.png")
    assert png.size == (4 * 64 + 5 * 4, 16 + 64 + 2 * 4)
    loaded, info = reconstruct.model_from_checkpoint(str(ckpt))
    assert info["norm_pix_loss"] is True and info["model"] == "checkpoint args" and info["input_size"] == 32


def test_authors_layouts_are_recognised(tmp_path, image):
    model = tiny()
    # a mae_visualize_* style file: weights only, the model recognised from their shapes
    torch.save({"model": model.state_dict()}, tmp_path / "vis.pth")
    loaded, info = reconstruct.model_from_checkpoint(str(tmp_path / "vis.pth"))
    assert info["name"] == NAME and info["input_size"] == 32 and info["model"] == "weight shapes"
    assert info["norm_pix_loss"] is False
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # the authors' training checkpoint: a pickled argparse.Namespace, read without unpickling it
    ns = argparse.Namespace(model=NAME, input_size=32, norm_pix_loss=True)
    torch.save({"model": model.state_dict(), "args": ns, "epoch": 3}, tmp_path / "train.pth")
    _, info = reconstruct.model_from_checkpoint(str(tmp_path / "train.pth"))
    assert info["norm_pix_loss"] is True and info["model"] == "checkpoint args"
    # --no-norm-pix-loss / --model win over what the file says
    _, info = reconstruct.model_from_checkpoint(str(tmp_path / "train.pth"), norm_pix_loss=False, model=NAME)
    assert info["norm_pix_loss"] is False and info["model"] == "--model"
    assert run("--checkpoint", tmp_path / "vis.pth", image, "--out-dir", tmp_path) == 0


def test_checkpoints_without_decoder_or_unknown_model_are_clear_errors(tmp_path, image, capsys):
    state = tiny().state_dict()
    encoder = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": encoder}, tmp_path / "enc.pth")
    with pytest.raises(ValueError, match="no decoder"):
        reconstruct.model_from_checkpoint(str(tmp_path / "enc.pth"))
    odd = dict(state)
    odd["blocks.9.norm1.weight"] = torch.ones(128)  # a depth no registered model has
    torch.save({"model": odd}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="give --model"):
        reconstruct.model_from_checkpoint(str(tmp_path / "odd.pth"))
    assert run("--checkpoint", tmp_path / "missing.pth", image) == 2
    assert "no file" in capsys.readouterr().err


def test_panels_paste_and_norm_pix_denormalisation():
    """A perfect predictor of the (per-patch normalised) target reconstructs the image exactly."""
    model = tiny(norm_pix_loss=True)

    class Oracle(torch.nn.Module):
        norm_pix_loss, num_patches = True, model.num_patches
        patchify, unpatchify = model.patchify, model.unpatchify

        def forward(self, imgs, mask_ratio, noise):
            _, _, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
            t = model.patchify(imgs)
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
            return torch.tensor(0.0), t, mask

    imgs = torch.randn(2, 3, 32, 32)
    p = reconstruct.reconstruct(Oracle(), imgs, mask_ratio=0.75, seed=1)
    torch.testing.assert_close(p["reconstruction"], imgs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(p["pasted"], imgs, atol=1e-4, rtol=1e-4)
    removed = (p["masked"] == 0).all(dim=1).float().mean().item()
    assert removed == pytest.approx(0.75)  # 12 of 16 patches blanked
    q = reconstruct.reconstruct(model, imgs, mask_ratio=0.75, seed=1)
    torch.testing.assert_close(q["masked"], p["masked"])  # the seed fixes the mask
    kept = p["masked"] != 0
    torch.testing.assert_close(q["pasted"][kept], imgs[kept])  # visible patches pasted back as they were
