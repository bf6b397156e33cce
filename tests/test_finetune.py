"""Fine-tuning and the linear probe: the authors' recipes (layer decay, LARS, mixup/cutmix, the
probe's head), partial fine-tuning, top-1/top-5, checkpoints and resume, a short demo."""
import argparse
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("PIL")

from conftest import read_metrics, torchrun  # noqa: E402
from mae_fast import finetune, finetune_optim, mixup, models_mae, models_vit  # noqa: E402
from mae_fast.demo_classes import CLASSES, DemoClasses  # noqa: E402

TINY = ["--device", "cpu", "--model", finetune.DEMO_MODEL, "--input-size", "32", "--batch-size", "8",
        "--num-workers", "0", "--no-progress", "--warmup-epochs", "1", "--log-every", "1",
        "--demo-images", "32", "16"]


def parse(mode, *argv) -> argparse.Namespace:
    return finetune.build_parser().parse_args([mode, *[str(a) for a in argv]])


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    """An MAE checkpoint of the demo model at 32 px (its encoder is vit_demo_patch8's)."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("mae") / "mae.pth"
    torch.save({"model": models_mae.create_model("mae_vit_demo_patch8", img_size=32).state_dict()}, path)
    return str(path)


# ---------------------------------------------------------------------------- layer decay
def authors_param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=[], layer_decay=.75):
    """The authors' util/lr_decay.py, verbatim but for the formatting."""
    param_group_names, param_groups = {}, {}
    num_layers = len(model.blocks) + 1
    layer_scales = list(layer_decay ** (num_layers - i) for i in range(num_layers + 1))
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or n in no_weight_decay_list:
            g_decay, this_decay = "no_decay", 0.
        else:
            g_decay, this_decay = "decay", weight_decay
        if n in ['cls_token', 'pos_embed']:
            layer_id = 0
        elif n.startswith('patch_embed'):
            layer_id = 0
        elif n.startswith('blocks'):
            layer_id = int(n.split('.')[1]) + 1
        else:
            layer_id = num_layers
        group_name = "layer_%d_%s" % (layer_id, g_decay)
        if group_name not in param_group_names:
            this_scale = layer_scales[layer_id]
            param_group_names[group_name] = {"lr_scale": this_scale, "weight_decay": this_decay, "params": []}
            param_groups[group_name] = {"lr_scale": this_scale, "weight_decay": this_decay, "params": []}
        param_group_names[group_name]["params"].append(n)
        param_groups[group_name]["params"].append(p)
    return list(param_groups.values())


@pytest.mark.parametrize("global_pool", [True, False])
def test_layer_decay_groups_are_the_authors(global_pool):
    model = models_vit.vit_demo_patch8(num_classes=3, global_pool=global_pool)
    ours = finetune_optim.param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.65)
    ref = authors_param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.65)
    assert len(ours) == len(ref) == 2 * (len(model.blocks) + 2)
    for a, b in zip(ours, ref):
        assert a["lr_scale"] == b["lr_scale"] and a["weight_decay"] == b["weight_decay"]
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
    assert ours[0]["lr_scale"] == pytest.approx(0.65 ** 5) and ours[-1]["lr_scale"] == 1.0
    opt = torch.optim.AdamW(ours, lr=1.0)
    from mae_fast import optim

    optim.adjust_learning_rate(opt, 5, lr=1e-3, min_lr=0, warmup_epochs=5, epochs=10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * g["lr_scale"] for g in ours])


# ---------------------------------------------------------------------------- LARS
def test_lars_is_the_authors():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    b = nn.Parameter(torch.randn(4))
    opt = finetune_optim.LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    w0, b0 = w.detach().clone(), b.detach().clone()
    mu_w = mu_b = 0
    for _ in range(2):
        w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
        dw = w.grad + 0.1 * w.detach()
        dw = dw * (0.001 * w.detach().norm() / dw.norm())
        mu_w = 0.9 * mu_w + dw
        mu_b = 0.9 * mu_b + b.grad  # 1-D: no weight decay, no trust ratio
        expect_w, expect_b = w.detach() - 0.5 * mu_w, b.detach() - 0.5 * mu_b
        opt.step()
        torch.testing.assert_close(w.detach(), expect_w)
        torch.testing.assert_close(b.detach(), expect_b)
    assert not torch.equal(w0, w.detach()) and not torch.equal(b0, b.detach())
    z = nn.Parameter(torch.zeros(2, 2))  # a zero parameter: trust ratio 1
    opt = finetune_optim.LARS([z], lr=1.0)
    z.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(z.detach(), -torch.ones(2, 2))


# ---------------------------------------------------------------------------- mixup / cutmix
def test_mixup_target_folds_label_smoothing_in_as_timm():
    y = torch.tensor([0, 2, 1, 1])
    t = mixup.mixup_target(y, 3, lam=0.7, smoothing=0.1)
    off, on = 0.1 / 3, 0.9 + 0.1 / 3
    y1 = torch.full((4, 3), off).scatter_(1, y[:, None], on)
    y2 = torch.full((4, 3), off).scatter_(1, y.flip(0)[:, None], on)
    torch.testing.assert_close(t, 0.7 * y1 + 0.3 * y2)
    torch.testing.assert_close(t.sum(-1), torch.ones(4))


def test_mixup_and_cutmix_mix_the_batch_with_its_flip():
    x = torch.randn(4, 3, 16, 16)
    m = mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=4)
    np.random.seed(1)
    lam, _ = m.params()
    np.random.seed(1)
    out, t = m(x.clone(), torch.arange(4))
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(t[0], torch.tensor([lam, 0, 0, 1 - lam]))

    c = mixup.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=4)
    for seed in range(5):
        np.random.seed(seed)
        out, t = c(x.clone(), torch.arange(4))
        from_flip = (out == x.flip(0)) & (out != x)
        kept = 1 - from_flip[0, 0].float().mean().item()
        assert t[0, 0].item() == pytest.approx(kept)  # lam is the area actually kept (correct_lam)

    both = mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=4)
    np.random.seed(0)
    kinds = [both.params()[1] for _ in range(400)]
    assert 0.4 < sum(kinds) / len(kinds) < 0.6  # switch_prob 0.5
    with pytest.raises(ValueError, match="even batch"):
        both(torch.randn(3, 3, 8, 8), torch.arange(3))


def test_soft_target_cross_entropy_is_label_smoothing_ce_on_smoothed_targets():
    logits, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    soft = mixup.mixup_target(y, 5, 1.0, 0.1)
    torch.testing.assert_close(mixup.soft_target_cross_entropy(logits, soft),
                               nn.CrossEntropyLoss(label_smoothing=0.1)(logits, y))


# ---------------------------------------------------------------------------- the models of the recipes
def test_linprobe_model_is_the_authors(mae_ckpt):
    args = finetune.resolve_defaults(parse("linprobe", *TINY))
    assert args.blr == 0.1 and args.weight_decay == 0.0 and args.global_pool is False and args.mixup == 0
    torch.manual_seed(0)
    model = finetune.build_model(args, 3, mae_ckpt)
    bn, fc = model.head
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6 and fc.in_features == 128
    assert 0.005 < fc.weight.std().item() < 0.015  # trunc normal std 0.01, not the loader's 2e-5
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    mae = torch.load(mae_ckpt, weights_only=True)["model"]
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, mae["blocks.0.attn.qkv.weight"])
    groups = finetune.optimizer_groups(args, model)
    assert groups == [{"params": ["head.1.weight", "head.1.bias"]}]


def test_partial_finetuning_trains_the_last_blocks_the_norm_and_the_head():
    model = models_vit.vit_demo_patch8(num_classes=3, global_pool=True)
    finetune.freeze(model, 1)
    trained = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
               for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"blocks.3", "fc_norm", "head"}
    groups = finetune_optim.param_group_names_lrd(model, 0.05, model.no_weight_decay(), 0.75)
    assert {n for g in groups for n in g["params"]} == {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="trainable-blocks"):
        finetune.freeze(model, 5)


def test_finetune_defaults_follow_the_authors_recipe_per_model():
    a = finetune.resolve_defaults(parse("finetune", "--model", "vit_base_patch16"))
    assert (a.epochs, a.blr, a.layer_decay, a.drop_path, a.smoothing, a.mixup, a.cutmix, a.weight_decay,
            a.reprob, a.aa, a.global_pool) == (100, 5e-4, 0.65, 0.1, 0.1, 0.8, 1.0, 0.05, 0.25,
                                               "rand-m9-mstd0.5-inc1", True)
    a = finetune.resolve_defaults(parse("finetune", "--model", "vit_huge_patch14", "--drop-path", "0.2"))
    assert (a.epochs, a.blr, a.layer_decay, a.drop_path) == (50, 1e-3, 0.75, 0.2)


def test_missing_timm_augmentations_are_reported(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_timm(name, *a, **k):
        if name.startswith("timm"):
            raise ImportError("No module named 'timm'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    args = finetune.resolve_defaults(parse("finetune", *TINY))
    transform, skipped = finetune.build_train_transform(args)
    assert len(skipped) == 2 and "RandAugment" in skipped[0] and "random erasing" in skipped[1]
    img = DemoClasses(1, size=48).images[0]
    assert transform(img).shape == (3, 32, 32)
    args.aa, args.reprob = "none", 0.0
    assert finetune.build_train_transform(args)[1] == []


def test_timm_augmentations_are_built_as_the_authors_build_them(monkeypatch):
    """With timm importable, the training transform is timm's ``create_transform`` called with the
    arguments of the authors' ``util/datasets.py`` (a stand-in module records them: timm and
    torchvision cannot be installed beside our torch)."""
    import types

    from mae_fast import data as data_mod

    calls = []
    timm_data = types.ModuleType("timm.data")
    timm_data.create_transform = lambda **kw: calls.append(kw) or "timm-transform"
    monkeypatch.setitem(sys.modules, "timm", types.ModuleType("timm"))
    monkeypatch.setitem(sys.modules, "timm.data", timm_data)
    args = finetune.resolve_defaults(parse("finetune", *TINY, "--aa", "rand-m7-mstd0.5", "--reprob", 0.3))
    assert finetune.build_train_transform(args) == ("timm-transform", [])
    assert calls == [dict(input_size=32, is_training=True, color_jitter=None, auto_augment="rand-m7-mstd0.5",
                          interpolation="bicubic", re_prob=0.3, re_mode="pixel", re_count=1,
                          scale=(args.min_crop_scale, 1.0), mean=data_mod.IMAGENET_DEFAULT_MEAN,
                          std=data_mod.IMAGENET_DEFAULT_STD)]
    args.aa = "none"  # random erasing alone still goes through timm, without RandAugment
    assert finetune.build_train_transform(args)[0] == "timm-transform" and calls[-1]["auto_augment"] is None


def test_eval_transform_resizes_by_256_over_224_then_centre_crops():
    from PIL import Image

    t = finetune.eval_transform(224)
    assert t.resize == 256
    img = Image.fromarray(np.zeros((300, 400, 3), np.uint8))
    assert t(img).shape == (3, 224, 224)


def test_demo_classes_are_balanced_and_seeded():
    a, b = DemoClasses(30, size=48, seed=5), DemoClasses(30, size=48, seed=5)
    assert a.labels == b.labels and sorted(set(a.labels)) == list(range(len(CLASSES)))
    assert [a.labels.count(c) for c in range(3)] == [10, 10, 10]
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


# ---------------------------------------------------------------------------- evaluation
def test_evaluate_counts_top1_and_top5():
    class Fixed(nn.Module):
        def forward(self, x):
            return x

    logits = torch.tensor([[9., 1, 2, 3, 4, 5, 6],   # label 0: top-1
                           [1., 9, 2, 3, 4, 5, 6],   # label 6: top-5 only
                           [0., 1, 2, 3, 4, 5, 6]])  # label 0: neither
    loader = [(logits, torch.tensor([0, 6, 0]))]
    args = argparse.Namespace(amp="none")
    r = finetune.evaluate(Fixed(), loader, args, finetune.DistInfo())
    assert r["acc1"] == pytest.approx(100 / 3) and r["acc5"] == pytest.approx(200 / 3) and r["n"] == 3
    assert r["loss"] == pytest.approx(nn.functional.cross_entropy(logits, torch.tensor([0, 6, 0])).item())


# ---------------------------------------------------------------------------- runs, checkpoints, resume
@pytest.mark.parametrize("mode", ["finetune", "linprobe"])
def test_run_checkpoints_and_resume_match_an_uninterrupted_run(tmp_path, mae_ckpt, mode):
    common = [*TINY, "--demo", "--pretrained", mae_ckpt, "--epochs", 2, "--save-every", 1, "--lr", 1e-3 if
              mode == "finetune" else 0.1]
    if mode == "finetune":
        common += ["--mixup", 0.8, "--cutmix", 1.0, "--aa", "none", "--reprob", 0, "--trainable-blocks", 2]
    full = finetune.train(parse(mode, *common, "--output-dir", tmp_path / "full"))
    assert len(full["history"]) == 2 and all(0 <= h["test_acc1"] <= 100 for h in full["history"])
    ckpt = torch.load(tmp_path / "full" / "checkpoint-1.pth", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "epoch", "scaler", "args"} and ckpt["args"]["mode"] == mode
    part = tmp_path / "part"
    os.makedirs(part)
    os.link(tmp_path / "full" / "checkpoint-0.pth", part / "checkpoint-0.pth")
    resumed = finetune.train(parse(mode, *common, "--output-dir", part, "--resume", "auto"))
    assert [h["epoch"] for h in resumed["history"]] == [1]
    assert resumed["history"][0]["train_loss"] == pytest.approx(full["history"][1]["train_loss"], rel=1e-5)
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ev = finetune.train(parse(mode, *common, "--output-dir", part, "--resume", part / "checkpoint-1.pth", "--eval"))
    assert ev["last"]["acc1"] == pytest.approx(full["history"][1]["test_acc1"])


def test_demo_prints_pretrained_against_random(tmp_path, mae_ckpt, capsys):
    args = parse("linprobe", *TINY, "--demo", "--pretrained", mae_ckpt, "--epochs", 1, "--output-dir", tmp_path)
    assert finetune.main(args) == 0
    out = capsys.readouterr().out
    assert "from the MAE-pretrained encoder vs" in out and "randomly initialised" in out
    assert os.path.exists(tmp_path / "pretrained" / "checkpoint-0.pth")
    assert os.path.exists(tmp_path / "random" / "checkpoint-0.pth")


def test_demo_without_a_pretrained_checkpoint_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(finetune, "DEMO_PRETRAIN_DIR", str(tmp_path / "nothing"))
    assert finetune.main(parse("linprobe", *TINY, "--demo")) == 2
    assert "pretrain --demo" in capsys.readouterr().err


# ---------------------------------------------------------------------------- distributed
@pytest.mark.parametrize("mode, extra", [
    ("finetune", ["--mixup", 0.8, "--cutmix", 1.0, "--aa", "none", "--reprob", 0, "--lr", 1e-3]),  # DDP
    ("linprobe", ["--fsdp", "--lr", 0.1]),                                                          # FSDP2
])
def test_two_gloo_processes_stay_in_sync_and_evaluate_the_whole_val_set(tmp_path, mae_ckpt, mode, extra):
    """The demo (both of its runs in one process group) on 2 gloo processes. Each rank draws its
    own drop path and mixup and sees its own share of the data; after 2 epochs both ranks hold
    the same weights and buffers (the probe's BatchNorm statistics included), the checkpoint is
    theirs, evaluation counts every validation image once, and the probe trains the head alone."""
    r = torchrun("mae_fast.finetune", mode, *TINY, "--demo", "--pretrained", mae_ckpt, "--epochs", 2,
                 "--save-every", 2, "--output-dir", tmp_path, "--dump-rank-state", *extra)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count(f"--- {mode} --demo: pretrained encoder") == 1 and "randomly initialised" in r.stdout
    mae = torch.load(mae_ckpt, weights_only=True)["model"]
    for run in ("pretrained", "random"):
        out = tmp_path / run
        s0 = torch.load(out / "rank0_state.pt", weights_only=True)
        s1 = torch.load(out / "rank1_state.pt", weights_only=True)
        assert s0.keys() == s1.keys()
        for k in s0:
            assert torch.equal(s0[k], s1[k]), f"{run}: the ranks' {k} differ"
        ckpt = torch.load(out / "checkpoint-1.pth", weights_only=True)
        assert ckpt["args"]["world_size"] == 2 and ckpt["model"].keys() == s0.keys()
        for k in s0:
            assert torch.equal(ckpt["model"][k], s0[k]), f"{run}: the checkpoint's {k} is not the ranks'"
        assert [e["test_images"] for e in read_metrics(out, "epoch")] == [16, 16]  # --demo-images 32 16
    s0 = torch.load(tmp_path / "pretrained" / "rank0_state.pt", weights_only=True)
    same = [torch.equal(s0[k], mae[k]) for k in s0 if k in mae]
    assert all(same) if mode == "linprobe" else not any(same), "the encoder is frozen iff the probe"
