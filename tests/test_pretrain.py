"""Pretraining: the authors' recipe, checkpoints and resume, bad input, and 2 gloo processes (DDP)."""
import argparse
import math
import os

import pytest
import torch

pytest.importorskip("PIL")

from conftest import read_metrics, torchrun  # noqa: E402
from mae_fast import data, models_mae, optim, pretrain  # noqa: E402

# A tiny run: the demo model at 32 px (L = 16 patches), 4-image batches.
TINY = ["--device", "cpu", "--model", pretrain.DEMO_MODEL, "--input-size", "32", "--batch-size", "4", "--num-workers", "0",
        "--no-progress", "--warmup-epochs", "1", "--log-every", "1"]


def parse(*argv) -> argparse.Namespace:
    return pretrain.build_parser().parse_args([str(a) for a in argv])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    data.save_demo_images(folder, 32, size=48, seed=7)
    return str(folder)


def params_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- the recipe
def test_the_demo_trains_on_normalised_pixels_unless_told_not_to():
    assert pretrain.resolve_defaults(parse()).norm_pix_loss is False  # the authors' default
    assert pretrain.resolve_defaults(parse("--norm-pix-loss")).norm_pix_loss is True
    assert pretrain.resolve_defaults(parse("--demo")).norm_pix_loss is True
    assert pretrain.resolve_defaults(parse("--demo", "--no-norm-pix-loss")).norm_pix_loss is False


def test_lr_schedule_is_the_authors():
    kw = dict(lr=1e-3, min_lr=1e-5, warmup_epochs=4, epochs=20)
    assert optim.lr_at(0, **kw) == 0.0
    assert optim.lr_at(2, **kw) == pytest.approx(5e-4)
    assert optim.lr_at(4, **kw) == pytest.approx(1e-3)
    assert optim.lr_at(12, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert optim.lr_at(20, **kw) == pytest.approx(1e-5)
    e = 9.3  # the authors' formula, verbatim
    ref = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1. + math.cos(math.pi * (e - 4) / (20 - 4)))
    assert optim.lr_at(e, **kw) == pytest.approx(ref)
    assert optim.absolute_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    o = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                           {"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}])
    assert optim.adjust_learning_rate(o, 2, **kw) == pytest.approx(5e-4)
    assert o.param_groups[1]["lr"] == pytest.approx(2.5e-4)


def timm_032_add_weight_decay(model, weight_decay=1e-5, skip_list=()):
    """timm 0.3.2's optim_factory.add_weight_decay, verbatim (the authors' main_pretrain.py)."""
    decay = []
    no_decay = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights
        if len(param.shape) == 1 or name.endswith(".bias") or name in skip_list:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {'params': no_decay, 'weight_decay': 0.},
        {'params': decay, 'weight_decay': weight_decay}]


def test_weight_decay_groups_are_the_authors_by_default():
    model = models_mae.create_model(pretrain.DEMO_MODEL, img_size=32)
    theirs = timm_032_add_weight_decay(model, 0.05)
    ours = optim.param_groups(model, 0.05)
    assert [[id(p) for p in g["params"]] for g in ours] == [[id(p) for p in g["params"]] for g in theirs]
    assert [g["weight_decay"] for g in ours] == [0.0, 0.05]
    assert parse("--demo").decay_tokens is True and parse("--no-decay-tokens").decay_tokens is False
    no_decay_t, decay_t = optim.param_group_names(model)
    assert "cls_token" in decay_t and "mask_token" in decay_t
    no_decay, decay = optim.param_group_names(model, decay_tokens=False)
    assert "cls_token" in no_decay and "mask_token" in no_decay
    assert "blocks.0.norm1.weight" in no_decay and "blocks.0.attn.qkv.bias" in no_decay
    assert "patch_embed.proj.bias" in no_decay and "decoder_pred.bias" in no_decay
    assert "blocks.0.attn.qkv.weight" in decay and "patch_embed.proj.weight" in decay
    assert "pos_embed" not in no_decay + decay and "decoder_pos_embed" not in no_decay + decay
    assert all(p.ndim >= 2 for n, p in model.named_parameters() if n in decay)


def test_batch_size_that_does_not_divide_is_a_clear_error(tmp_path, images):
    args = parse(*TINY, "--data-path", images, "--output-dir", tmp_path, "--epochs", 1,
                 "--global-batch-size", 10, "--accum-iter", 3)
    with pytest.raises(ValueError, match="--global-batch-size 10 does not divide by .* 1 x 3 = 3"):
        pretrain.train(args)
    args = parse(*TINY, "--data-path", images, "--output-dir", tmp_path, "--epochs", 1, "--batch-size", 64)
    with pytest.raises(ValueError, match="fewer than one batch"):
        pretrain.train(args)
    assert pretrain.main(parse("--data-path", tmp_path / "empty", "--output-dir", tmp_path, *TINY)) == 2


def test_global_batch_and_accumulation_set_the_lr(tmp_path, images):
    args = parse(*TINY, "--data-path", images, "--output-dir", tmp_path, "--epochs", 1, "--global-batch-size", 8,
                 "--accum-iter", 2, "--blr", 1e-3)
    summary = pretrain.train(args)
    assert args.batch_size == 4 and args.effective_batch_size == 8
    assert args.lr == pytest.approx(1e-3 * 8 / 256)
    steps = [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "iter"]
    assert steps == [0, 1, 1, 2, 2, 3, 3, 4]  # 8 iterations, an optimizer step every 2
    assert len(summary["losses"]) == 8


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("workers", [0, 2])
def test_checkpoint_layout_resume_and_loss_falls(tmp_path, images, workers):
    """The authors' layout, readable with weights_only=True; an interrupted run resumes at the next
    epoch and ends with exactly the weights of an uninterrupted one (data loader workers too)."""
    common = [*TINY, "--data-path", images, "--lr", 3e-3, "--epochs", 3, "--save-every", 1,
              "--num-workers", workers]
    full = pretrain.train(parse(*common, "--output-dir", tmp_path / "full"))
    first = full["epoch_losses"]
    assert first[-1] < first[0], f"loss did not fall: {first}"

    ckpt = torch.load(tmp_path / "full" / "checkpoint-2.pth", map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "epoch", "scaler", "args"}
    assert ckpt["epoch"] == 2 and isinstance(ckpt["args"], dict)
    assert ckpt["args"]["model"] == pretrain.DEMO_MODEL and ckpt["args"]["input_size"] == 32
    assert set(ckpt["scaler"]) >= {"scale", "_growth_tracker"}
    assert [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]] == \
        [len(n) for n in optim.param_group_names(full["model"])]
    assert not [f for f in os.listdir(tmp_path / "full") if f.endswith(".tmp")]
    from mae_fast.checkpoint import load_pretrained

    fresh = models_mae.create_model(pretrain.DEMO_MODEL, img_size=32)
    assert not load_pretrained(fresh, str(tmp_path / "full" / "checkpoint-2.pth")).missing

    # "interrupted" after epoch 1: resume from checkpoint-1 -> epoch 2 only
    part = tmp_path / "part"
    os.makedirs(part)
    os.link(tmp_path / "full" / "checkpoint-1.pth", part / "checkpoint-1.pth")
    resumed = pretrain.train(parse(*common, "--output-dir", part, "--resume", "auto"))
    assert resumed["start_epoch"] == 2 and len(resumed["epoch_losses"]) == 1
    assert resumed["epoch_losses"][0] == pytest.approx(first[2], rel=1e-5)
    assert params_equal(full["model"].state_dict(), resumed["model"].state_dict())


def test_resume_from_another_model_is_a_clear_error(tmp_path, images):
    other = models_mae.create_model("mae_vit_tiny_patch16", img_size=32)
    torch.save({"model": other.state_dict(), "epoch": 0}, tmp_path / "other.pth")
    args = parse(*TINY, "--data-path", images, "--output-dir", tmp_path, "--epochs", 1,
                 "--resume", tmp_path / "other.pth")
    with pytest.raises(ValueError, match="holds another model"):
        pretrain.train(args)
    mine = models_mae.create_model(pretrain.DEMO_MODEL, img_size=32)
    torch.save({"model": mine.state_dict(), "epoch": 0, "args": {"model": pretrain.DEMO_MODEL, "input_size": 48}},
               tmp_path / "size.pth")
    args = parse(*TINY, "--data-path", images, "--output-dir", tmp_path, "--epochs", 1,
                 "--resume", tmp_path / "size.pth")
    with pytest.raises(ValueError, match="--input-size 48"):
        pretrain.train(args)
    args = parse(*TINY, "--data-path", images, "--output-dir", tmp_path, "--resume", tmp_path / "missing.pth")
    assert pretrain.main(args) == 2
    # the authors' optimizer groups (tokens decayed) against a --no-decay-tokens run, and back
    opt = torch.optim.AdamW(timm_032_add_weight_decay(mine, 0.05))
    torch.save({"model": mine.state_dict(), "optimizer": opt.state_dict(), "epoch": 0}, tmp_path / "authors.pth")
    args = parse(*TINY, "--data-path", images, "--output-dir", tmp_path, "--epochs", 1, "--no-decay-tokens",
                 "--resume", tmp_path / "authors.pth")
    with pytest.raises(ValueError, match="drop --no-decay-tokens"):
        pretrain.train(args)
    opt = torch.optim.AdamW(optim.param_groups(mine, 0.05, decay_tokens=False))
    torch.save({"model": mine.state_dict(), "optimizer": opt.state_dict(), "epoch": 0}, tmp_path / "old.pth")
    args = parse(*TINY, "--data-path", images, "--output-dir", tmp_path, "--epochs", 1, "--resume", tmp_path / "old.pth")
    with pytest.raises(ValueError, match="add --no-decay-tokens"):
        pretrain.train(args)


def test_default_checkpoint_resumes_in_the_authors_load_model(tmp_path, images):
    """Their util/misc.load_model, verbatim but for the names, on a default mae_fast checkpoint, with
    their optimizer (AdamW over timm 0.3.2's add_weight_decay groups) and NativeScaler."""
    pretrain.train(parse(*TINY, "--data-path", images, "--output-dir", tmp_path, "--epochs", 1, "--lr", 1e-3))
    args = argparse.Namespace(resume=str(tmp_path / "checkpoint-0.pth"), start_epoch=0)
    model_without_ddp = models_mae.create_model(pretrain.DEMO_MODEL, img_size=32)
    optimizer = torch.optim.AdamW(timm_032_add_weight_decay(model_without_ddp, 0.05), lr=1e-3, betas=(0.9, 0.95))
    loss_scaler = torch.amp.GradScaler("cpu", enabled=False)
    # --- their load_model
    checkpoint = torch.load(args.resume, map_location='cpu')
    model_without_ddp.load_state_dict(checkpoint['model'])
    if 'optimizer' in checkpoint and 'epoch' in checkpoint and not (hasattr(args, 'eval') and args.eval):
        optimizer.load_state_dict(checkpoint['optimizer'])
        args.start_epoch = checkpoint['epoch'] + 1
        if 'scaler' in checkpoint:
            loss_scaler.load_state_dict(checkpoint['scaler'])
    # ---
    assert args.start_epoch == 1
    assert all(len(optimizer.state[p]) == 3 for g in optimizer.param_groups for p in g["params"])
    token = model_without_ddp.cls_token
    assert torch.equal(optimizer.state[token]["exp_avg"], checkpoint["optimizer"]["state"][
        [i for i, p in enumerate(optimizer.param_groups[0]["params"] + optimizer.param_groups[1]["params"])
         if p is token][0]]["exp_avg"])
    loss, _, _ = model_without_ddp(torch.randn(2, 3, 32, 32))
    loss.backward()
    optimizer.step()  # their training goes on


def test_non_finite_loss_stops_clearly(tmp_path, images, capsys):
    args = parse(*TINY, "--data-path", images, "--output-dir", tmp_path, "--epochs", 2, "--warmup-epochs", 0,
                 "--lr", 1e30)
    with pytest.raises(pretrain.NonFiniteLossError, match="the loss is (nan|inf)"):
        pretrain.train(args)
    args = parse(*TINY, "--data-path", images, "--output-dir", tmp_path, "--epochs", 2, "--warmup-epochs", 0,
                 "--lr", 1e30)
    assert pretrain.main(args) == 1
    assert "stopping" in capsys.readouterr().err


def test_demo_path_writes_a_reconstruction(tmp_path):
    args = parse("--demo", "--demo-images", 16, "--input-size", 32, "--batch-size", 8, "--epochs", 1,
                 "--num-workers", 0, "--no-progress", "--output-dir", tmp_path)
    assert pretrain.main(args) == 0
    assert os.path.getsize(tmp_path / "demo_reconstruction.png") > 0
    assert os.path.exists(tmp_path / "checkpoint-0.pth")


# ---------------------------------------------------------------------------- distributed
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, images):
    """4 epochs on 2 gloo processes (DDP); checkpoints after epochs 1 and 3."""
    out = tmp_path_factory.mktemp("ddp")
    r = torchrun("mae_fast.pretrain", *TINY, "--data-path", images, "--output-dir", out, "--epochs", 4,
                 "--lr", 3e-3, "--save-every", 2, "--dump-rank-state")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_ddp_two_gloo_processes_stay_in_sync_and_learn(ddp_run):
    out = ddp_run
    s0 = torch.load(out / "rank0_state.pt", weights_only=True)
    s1 = torch.load(out / "rank1_state.pt", weights_only=True)
    assert params_equal(s0, s1), "the two ranks' parameters differ"
    ckpt = torch.load(out / "checkpoint-3.pth", weights_only=True)
    assert params_equal(ckpt["model"], s0) and ckpt["args"]["world_size"] == 2
    files = sorted(os.listdir(out))
    events = [f for f in files if f.startswith("events.out.tfevents")]  # when tensorboard is installed
    assert [f for f in files if f not in events] == ["checkpoint-1.pth", "checkpoint-3.pth", "metrics.jsonl",
                                                     "rank0_state.pt", "rank1_state.pt"]  # rank 0 alone writes
    assert len(events) <= 1
    losses = [r["train_loss"] for r in read_metrics(out) if r["kind"] == "epoch"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses


def test_fsdp2_resumes_a_ddp_checkpoint_and_matches_ddp(tmp_path, images, ddp_run):
    """FSDP2 (fully_shard per Block) on 2 gloo processes: resumed from the DDP run's epoch-1
    checkpoint, its epochs 2-3 give the DDP run's weights and optimizer state; its checkpoint is
    in the same (unsharded, position-keyed) layout."""
    os.link(ddp_run / "checkpoint-1.pth", tmp_path / "checkpoint-1.pth")
    r = torchrun("mae_fast.pretrain", *TINY, "--data-path", images, "--output-dir", tmp_path, "--epochs", 4,
                 "--lr", 3e-3, "--save-every", 2, "--fsdp", "--resume", "auto")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "FSDP2" in r.stdout and "next epoch 2" in r.stdout
    ours = torch.load(tmp_path / "checkpoint-3.pth", weights_only=True)
    ref = torch.load(ddp_run / "checkpoint-3.pth", weights_only=True)
    assert ours["model"].keys() == ref["model"].keys()
    for k in ref["model"]:
        torch.testing.assert_close(ours["model"][k], ref["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert ours["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"]
    for i, st in ref["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours["optimizer"]["state"][i][name], st[name], rtol=1e-3, atol=1e-6)


def test_batch_that_does_not_divide_by_the_processes_is_a_clear_error():
    args = pretrain.resolve_defaults(parse(*TINY, "--global-batch-size", 7))
    with pytest.raises(ValueError, match="does not divide by processes x --accum-iter = 2 x 1 = 2"):
        pretrain._batch_sizes(args, pretrain.DistInfo(rank=0, world_size=2))
    args = pretrain.resolve_defaults(parse(*TINY, "--global-batch-size", 8, "--accum-iter", 2))
    pretrain._batch_sizes(args, pretrain.DistInfo(rank=1, world_size=2))
    assert args.batch_size == 2 and args.effective_batch_size == 8
