"""export: the encoder as timm VisionTransformer keys and as a HuggingFace ViT folder that
transformers loads and whose features equal ours."""
import os

import pytest
import torch

from mae_fast import export, models_mae, models_vit
from mae_fast.layers import forward_blocks

IMG = 32


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = models_mae.create_model("mae_vit_demo_patch8", img_size=IMG)
    path = tmp_path_factory.mktemp("mae") / "checkpoint-0.pth"
    torch.save({"model": model.state_dict(), "epoch": 0, "args": {"model": "mae_vit_demo_patch8"}}, path)
    return str(path)


def timm_mae_keys(depth: int) -> list[str]:
    """The keys of timm's vit_*_patch16_224.mae weights (num_classes=0), in order."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"blocks.{i}.{m}.weight", f"blocks.{i}.{m}.bias"]
    return keys + ["norm.weight", "norm.bias"]


def test_timm_keys_are_timms_mae_weights_and_load_into_models_vit(mae_ckpt, tmp_path):
    state = export.timm_state_dict(mae_ckpt)
    assert list(state) == timm_mae_keys(4)
    vit = models_vit.create_model("vit_demo_patch8", img_size=IMG, num_classes=0)
    vit.load_state_dict(state, strict=True)
    assert export.main(export.add_arguments(__import__("argparse").ArgumentParser()).parse_args(
        [mae_ckpt, "--timm", str(tmp_path / "vit.safetensors")])) == 0
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "vit.safetensors")) == set(state)


def test_timm_keys_match_timm_itself_when_it_imports():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224.mae", pretrained=False)
    assert list(model.state_dict()) == timm_mae_keys(12)


def test_linear_probe_head_is_folded_into_one_linear():
    torch.manual_seed(1)
    bn = torch.nn.BatchNorm1d(8, affine=False, eps=1e-6)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    fc = torch.nn.Linear(8, 3)
    head = torch.nn.Sequential(bn, fc).eval()
    state = {f"head.{k}": v for k, v in head.state_dict().items()}
    folded = export.fold_probe_head(state)
    x = torch.randn(5, 8)
    torch.testing.assert_close(x @ folded["head.weight"].T + folded["head.bias"], head(x))


@pytest.mark.parametrize("scheme", ["v4", "v5"])
def test_hf_vitmodel_folder_loads_in_transformers_with_our_features(mae_ckpt, tmp_path, scheme):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "hf"
    lines = export.export(mae_ckpt, hf_folder=folder, scheme=scheme)
    assert "ViTModel" in lines[0] and os.path.exists(folder / "config.json")
    hf_model = transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    assert hf_model.config.num_attention_heads == 4 and hf_model.config.layer_norm_eps == 1e-6
    vit = models_vit.create_model("vit_demo_patch8", img_size=IMG, num_classes=0, backend="torch").eval()
    vit.load_state_dict(export.timm_state_dict(mae_ckpt))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        theirs = hf_model(pixel_values=x).last_hidden_state
        tokens = torch.cat((vit.cls_token.expand(2, -1, -1), vit.patch_embed(x)), 1) + vit.pos_embed
        ours = forward_blocks(vit.blocks, tokens, vit.norm)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs[:, 0], vit.forward_features(x), rtol=1e-5, atol=1e-5)


def test_hf_classifier_of_a_cls_token_model_and_global_pool_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    vit = models_vit.create_model("vit_demo_patch8", img_size=IMG, num_classes=5, backend="torch").eval()
    export.export({"model": vit.state_dict(), "args": {"model": "vit_demo_patch8"}}, hf_folder=tmp_path / "c")
    hf_model = transformers.ViTForImageClassification.from_pretrained(tmp_path / "c").eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(pixel_values=x).logits, vit(x), rtol=1e-5, atol=1e-5)
    gp = models_vit.create_model("vit_demo_patch8", img_size=IMG, num_classes=5, global_pool=True)
    with pytest.raises(ValueError, match="global-pool"):
        export.export({"model": gp.state_dict()}, hf_folder=tmp_path / "gp")
    assert list(export.timm_state_dict({"model": gp.state_dict()}))[-4:] == [
        "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]
