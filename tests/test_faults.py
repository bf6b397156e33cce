"""Runs that survive faults: SIGKILL mid-epoch, mid-checkpoint-write and before the rename resume to
exactly the weights of an uninterrupted run; a failing write (disk full) leaves the previous
checkpoint intact and stops clearly; a truncated checkpoint is one clear error naming the newest
intact one, and ``--resume auto`` passes it over."""
import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("PIL")

from mae_fast import checkpoint, data, pretrain  # noqa: E402

TINY = ["--device", "cpu", "--model", pretrain.DEMO_MODEL, "--input-size", "32", "--batch-size", "4",
        "--num-workers", "0", "--no-progress", "--warmup-epochs", "1", "--log-every", "1", "--lr", "3e-3",
        "--epochs", "3", "--save-every", "1"]

# Runs pretraining in a subprocess; FAULT=<where>:<epoch>[:<iter>] makes the process SIGKILL itself there:
#   iter:E:I    after iteration I of epoch E (mid-epoch)
#   write:E     halfway through writing checkpoint-E (the .tmp half written)
#   rename:E    after checkpoint-E.tmp is complete and fsynced, before the rename
RUNNER = textwrap.dedent("""
    import io, os, signal, sys
    import torch
    from mae_fast import checkpoint, pretrain
    fault = os.environ.get("FAULT", "")
    where, _, rest = fault.partition(":")
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if where == "iter":
        e, i = (int(v) for v in rest.split(":"))
        write = pretrain._Log.write
        def log_write(self, **r):
            write(self, **r)
            if r.get("kind") == "iter" and r["epoch"] == e and r["iter"] == i:
                die()
        pretrain._Log.write = log_write
    elif where in ("write", "rename"):
        e = int(rest)
        save, replace = torch.save, os.replace
        def torch_save(obj, f, *a, **k):
            if isinstance(obj, dict) and obj.get("epoch") == e and where == "write":
                buf = io.BytesIO()
                save(obj, buf, *a, **k)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                die()
            return save(obj, f, *a, **k)
        def os_replace(src, dst):
            if where == "rename" and dst.endswith(f"checkpoint-{e}.pth"):
                die()
            return replace(src, dst)
        torch.save, checkpoint.os.replace = torch_save, os_replace
    sys.exit(pretrain.main(pretrain.build_parser().parse_args(sys.argv[1:])))
""")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    data.save_demo_images(folder, 32, size=48, seed=7)
    return str(folder)


def run(tmp_path, out, images, fault="", *extra):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "FAULT": fault, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, str(runner), *TINY, "--data-path", images, "--output-dir", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=300)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_sigkill_at_several_points_resumes_to_the_uninterrupted_weights(tmp_path, images):
    ref = run(tmp_path, tmp_path / "ref", images)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    kills = [("iter:1:3", ["checkpoint-0.pth"]),             # mid-epoch 1: checkpoint-0 only
             ("write:1", ["checkpoint-0.pth"]),              # mid-write of checkpoint-1: a half .tmp, no -1
             ("rename:2", ["checkpoint-0.pth", "checkpoint-1.pth"])]  # -2.tmp complete, not renamed
    for fault, expect in kills:
        r = run(tmp_path, out, images, fault, "--resume", "auto")
        assert r.returncode == -signal.SIGKILL, (fault, r.returncode, r.stderr[-2000:])
        assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == expect, fault
    assert (out / "checkpoint-1.pth").exists() and (out / "checkpoint-2.pth.tmp").exists()
    final = run(tmp_path, out, images, "", "--resume", "auto")
    assert final.returncode == 0, final.stderr
    assert "resumed from" in final.stdout and "checkpoint-1.pth" in final.stdout
    a, b = weights(tmp_path / "ref" / "checkpoint-2.pth"), weights(out / "checkpoint-2.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "checkpoint-2.pth.tmp").exists()  # the last write replaced the stale one


def test_failing_write_keeps_the_previous_checkpoint_and_stops_clearly(tmp_path, images, monkeypatch, capsys):
    save = torch.save

    def full_disk(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("epoch") == 1:
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    args = pretrain.build_parser().parse_args([*TINY, "--data-path", images, "--output-dir", str(tmp_path)])
    assert pretrain.main(args) == 1
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "checkpoint-1.pth" in err and "No space left" in err
    assert "newest intact checkpoint is" in err and "checkpoint-0.pth" in err
    files = [f for f in sorted(os.listdir(tmp_path)) if not f.startswith("events.out.tfevents")]
    assert files == ["checkpoint-0.pth", "metrics.jsonl"]  # no .tmp, no -1
    assert checkpoint.checkpoint_is_intact(str(tmp_path / "checkpoint-0.pth"))


def test_truncated_checkpoint_is_one_clear_error_and_auto_passes_it_over(tmp_path, images, capsys):
    args = pretrain.build_parser().parse_args([*TINY, "--epochs", "2", "--data-path", images,
                                               "--output-dir", str(tmp_path)])
    assert pretrain.main(args) == 0
    good, bad = tmp_path / "checkpoint-0.pth", tmp_path / "checkpoint-1.pth"
    blob = bad.read_bytes()
    bad.write_bytes(blob[: len(blob) // 3])
    (tmp_path / "checkpoint-5.pth").write_bytes(b"not a zip at all")
    capsys.readouterr()
    for name in ("checkpoint-1.pth", "checkpoint-5.pth"):
        args = pretrain.build_parser().parse_args([*TINY, "--epochs", "2", "--data-path", images,
                                                   "--output-dir", str(tmp_path), "--resume", str(tmp_path / name)])
        assert pretrain.main(args) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"{name}' is truncated or corrupt" in err and f"beside it is '{good}'" in err
    args = pretrain.build_parser().parse_args([*TINY, "--epochs", "2", "--data-path", images,
                                               "--output-dir", str(tmp_path), "--resume", "auto"])
    summary = pretrain.train(args)
    out = capsys.readouterr().out
    assert "passing over" in out and "checkpoint-5.pth" in out and "checkpoint-1.pth" in out
    assert summary["start_epoch"] == 1
    # a truncated checkpoint with nothing intact beside it
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "checkpoint-3.pth").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint beside it"):
        checkpoint.read_checkpoint(str(lonely / "checkpoint-3.pth"))


def bad_folder(folder):
    """6 good demo images and 6 awkward ones: unreadable, truncated, CMYK, grayscale, 16-bit, tiny."""
    import numpy as np
    from PIL import Image

    data.save_demo_images(folder, 6, size=48, seed=11)
    (folder / "x_unreadable.jpg").write_bytes(b"\x00 definitely not an image " * 20)
    buf = folder / "tmp.jpg"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, quality=95)
    blob = buf.read_bytes()
    buf.unlink()
    (folder / "x_truncated.jpg").write_bytes(blob[: len(blob) // 2])
    Image.new("CMYK", (50, 40), (0, 255, 255, 0)).save(folder / "x_cmyk.jpg")
    Image.new("L", (40, 50), 128).save(folder / "x_gray.png")
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(folder / "x_16bit.png")
    Image.new("RGB", (2, 3), (255, 255, 255)).save(folder / "x_tiny.png")
    return folder


def test_awkward_images_train_with_skips_counted_or_stop_clearly(tmp_path, capsys):
    folder = bad_folder(tmp_path / "imgs")
    assert data.to_mode(data.open_image(str(folder / "x_16bit.png"))).getpixel((0, 0)) == (156, 156, 156)  # round(40000 / 65535 * 255)
    assert data.to_mode(data.open_image(str(folder / "x_cmyk.jpg"))).getpixel((0, 0))[0] > 200  # red, not black
    common = [a for a in TINY if a not in ("--epochs", "3")] + ["--data-path", str(folder), "--epochs", "2"]
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        summary = pretrain.train(pretrain.build_parser().parse_args([*common, "--output-dir", str(tmp_path / "run")]))
    # per epoch: x_truncated (its stand-in, x_unreadable, is unreadable too: 2 skips) and x_unreadable (1)
    assert summary["skipped_images"] == 6
    epochs = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["skipped_images"] for r in epochs] == [3, 3]
    assert all(torch.isfinite(torch.tensor(summary["losses"])))
    capsys.readouterr()
    with pytest.warns(UserWarning):
        assert pretrain.main(pretrain.build_parser().parse_args([*common, "--output-dir", str(tmp_path / "run2")])) == 0
    assert "skipped an unreadable image 6 times in all" in capsys.readouterr().out
    code = pretrain.main(pretrain.build_parser().parse_args([*common, "--output-dir", str(tmp_path / "run3"),
                                                             "--on-bad-image", "error"]))
    err = capsys.readouterr().err
    assert code == 2 and "cannot read image" in err and "x_" in err and "--on-bad-image skip" in err


def read_jsonl(path):
    import json

    with open(path) as f:
        return [json.loads(line) for line in f]
