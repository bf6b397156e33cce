"""The input pipeline: the per-stage loader benchmark, the uint8 / draft / device paths against the
exact one, tar shards, --mean/--std, single-channel data, TensorBoard and --compile."""
import argparse
import os

import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from mae_fast import data, loader_bench, pretrain, shards  # noqa: E402

TINY = ["--device", "cpu", "--model", pretrain.DEMO_MODEL, "--input-size", "32", "--batch-size", "4",
        "--num-workers", "0", "--no-progress", "--warmup-epochs", "1", "--log-every", "1", "--lr", "1e-3"]


def parse(*argv) -> argparse.Namespace:
    return pretrain.build_parser().parse_args([str(a) for a in argv])


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpegs")
    loader_bench.write_synthetic_jpegs(str(folder), 8)
    return str(folder)


def test_loader_bench_reports_every_stage_and_the_bottleneck(jpegs, tmp_path, capsys):
    parser = loader_bench.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--data", jpegs, "--workers", "0,1", "--images", "8", "--loader-batch-size", "4",
                              "--loader-batches", "2", "--rounds", "1", "--input-size", "64", "--model", pretrain.DEMO_MODEL,
                              "--model-batch-size", "2", "--json", str(tmp_path / "r.json")])
    assert loader_bench.main(args) == 0
    out = capsys.readouterr().out
    for title in loader_bench.STAGE_TITLES.values():
        assert title in out
    assert "before: exact, pil, host float (the authors)" in out and "workers   1" in out
    assert "bottleneck" in out and "device vs exact" in out and "draft vs exact" in out
    assert os.path.getsize(tmp_path / "r.json") > 100
    sizes = {Image.open(os.path.join(jpegs, f)).size for f in os.listdir(jpegs)}
    assert sizes == {(500, 375), (375, 500)}
    args = parser.parse_args(["--synthetic-jpeg", "4", "--workers", "0", "--images", "4", "--loader-batch-size", "2",
                              "--loader-batches", "1", "--rounds", "1", "--input-size", "32", "--model", "none", "--decode", "exact"])
    assert loader_bench.main(args) == 0
    assert "bottleneck" not in capsys.readouterr().out


def test_uint8_path_is_bit_identical_and_device_path_close(jpegs):
    paths = data.find_images(jpegs)[0]
    exact = data.PretrainTransform(48)
    fast = data.PretrainTransform(48, output="uint8")
    for k, p in enumerate(paths):
        torch.manual_seed(k)
        a = exact(data.open_image(p))
        torch.manual_seed(k)
        b = fast(data.open_image(p))
        assert b.dtype == torch.uint8 and torch.equal(data.normalize_batch(b[None])[0], a)
    diff = loader_bench.pixel_difference(paths, 48, "device")
    assert diff["mean_abs"] < 0.5 and diff["p99_abs"] <= 2.01 and diff["max_abs"] <= 24
    # the same draws: the RNG is where the exact path leaves it
    torch.manual_seed(3)
    data.PretrainTransform(48)(data.open_image(paths[0]))
    after_exact = torch.rand(1)
    torch.manual_seed(3)
    data.DeviceAugmentTransform(48)(data.open_image(paths[0]))
    assert torch.equal(after_exact, torch.rand(1))


def test_simplejpeg_gives_pils_pixels(jpegs, tmp_path):
    pytest.importorskip("simplejpeg")
    from PIL import Image as PILImage

    gray = tmp_path / "gray.jpg"
    PILImage.new("L", (30, 20), 77).save(gray)
    paths = data.find_images(jpegs)[0] + [str(gray)]
    assert loader_bench.pixel_difference(paths, 48, "simplejpeg")["max_abs"] == 0
    assert data.jpeg_decoder() == "simplejpeg" and data.jpeg_decoder("pil") == "pil"
    cmyk = tmp_path / "cmyk.jpg"
    PILImage.new("CMYK", (20, 20), (0, 255, 255, 0)).save(cmyk)
    assert data.open_image(str(cmyk)).mode == "CMYK"  # simplejpeg cannot: PIL decodes it


def test_draft_decodes_large_jpegs_at_a_reduced_scale(tmp_path):
    loader_bench.write_synthetic_jpegs(str(tmp_path), 4)
    paths = data.find_images(tmp_path)[0]
    diff = loader_bench.pixel_difference(paths, 32, "draft")  # crops of 150-500 px -> 32 px: 1/2-1/8 scale
    assert diff["drafted"] == len(paths)
    assert diff["mean_abs"] < 4.0 and diff["psnr_db"] > 30
    assert data.draft_factor(480, 300, 224) == 1 and data.draft_factor(1000, 900, 224) == 4


def test_shards_write_split_and_train(tmp_path):
    src = tmp_path / "src"
    data.save_demo_images(src / "a", 10, size=40, seed=1)
    data.save_demo_images(src / "b", 9, size=40, seed=2)
    index = shards.write_shards(str(src), str(tmp_path / "sh"), shard_size=4, say=lambda *a: None)
    assert index["count"] == 19 and [s["count"] for s in index["shards"]] == [4, 4, 4, 4, 3]
    assert shards.is_shards(str(tmp_path / "sh")) and not shards.is_shards(str(src))
    seen = []
    for rank in range(2):
        ds = shards.TarShards(str(tmp_path / "sh"), data.PretrainTransform(16), rank=rank, world_size=2, seed=0)
        ds.batch_size = 3
        keys = [x.shape for x, _ in ds]
        assert len(keys) == 9  # 19 // 2 = 9: 3 whole batches of 3, the same on both ranks
        seen.append(len(keys))
    assert seen == [9, 9]
    ds = shards.TarShards(str(tmp_path / "sh"), data.PretrainTransform(16), seed=0)
    ds.batch_size = 2  # whole batches per worker: 9 batches over 2 workers, none partial
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    assert [x.shape[0] for x, _ in loader] == [2] * 9
    summary = pretrain.train(parse(*TINY, "--data-path", tmp_path / "sh", "--output-dir", tmp_path / "run",
                                   "--epochs", 2, "--num-workers", 2))
    assert len(summary["losses"]) == 2 * (19 // 4)
    assert shards.main(argparse.Namespace(data=str(tmp_path / "none"), out=str(tmp_path / "x"), shard_size=2)) == 2


def test_mean_std_and_single_channel(tmp_path):
    folder = tmp_path / "gray"
    folder.mkdir()
    for k in range(8):
        Image.new("L", (40, 36), 30 * k).save(folder / f"{k}.png")
    assert data.parse_mean_std("0.5", 3, "mean") == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="--std needs 1 value"):
        data.parse_mean_std("0.1,0.2", 1, "std")
    mean, std = data.measure_mean_std(str(folder), 1)
    assert mean[0] == pytest.approx(sum(30 * k for k in range(8)) / 8 / 255, abs=1e-3)
    args = parse(*TINY, "--data-path", folder, "--output-dir", tmp_path / "run", "--epochs", 1, "--in-chans", 1,
                 "--mean", "data", "--std", "data")
    summary = pretrain.train(args)
    assert args.mean == pytest.approx(mean) and summary["model"].in_chans == 1
    ckpt = torch.load(tmp_path / "run" / "checkpoint-0.pth", weights_only=True)
    assert ckpt["args"]["mean"] == pytest.approx(list(mean))
    x = data.PretrainTransform(16, mean=(0.5,), std=(0.25,), channels=1)(Image.new("RGB", (20, 20), (255, 0, 0)))
    assert x.shape == (1, 16, 16)


def test_device_augment_trains_and_tensorboard_and_compile(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    data.save_demo_images(folder, 8, size=48, seed=3)
    compiled = []
    monkeypatch.setattr(pretrain.models_mae.MaskedAutoencoderViT, "compile_blocks",
                        lambda self, **kw: compiled.append(1) or self)
    summary = pretrain.train(parse(*TINY, "--data-path", folder, "--output-dir", tmp_path / "run", "--epochs", 1,
                                   "--augment", "device", "--compile"))
    assert compiled == [1] and len(summary["losses"]) == 2
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        pytest.skip("tensorboard not installed (optional extra)")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "run"))


def test_cli_bench_data_and_shards(tmp_path, capsys):
    from mae_fast import cli

    assert cli.main(["bench", "--synthetic-jpeg", "4", "--workers", "0", "--images", "4", "--loader-batch-size", "2",
                     "--loader-batches", "1", "--rounds", "1", "--img-size", "32", "--model", pretrain.DEMO_MODEL, "--batch-size", "2",
                     "--decode", "exact"]) == 0
    out = capsys.readouterr().out
    assert "per stage" in out and "mae_vit_demo_patch8" in out and "bottleneck" in out
    data.save_demo_images(tmp_path / "src", 3, size=40)
    assert cli.main(["shards", "--data", str(tmp_path / "src"), "--out", str(tmp_path / "sh"), "--shard-size", "2"]) == 0
    assert sorted(os.listdir(tmp_path / "sh")) == ["shard-000000.tar", "shard-000001.tar", "shards.json"]
