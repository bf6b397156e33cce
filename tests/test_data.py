"""The image folder, the authors' augmentation in plain torch + PIL, synthetic and demo data."""
import os
import warnings

import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from mae_fast import data, pretrain  # noqa: E402


def _write(path, size=(40, 30), color=(200, 30, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_folder_flat_and_class_subfolders(tmp_path):
    _write(str(tmp_path / "a.png"))
    _write(str(tmp_path / "cat" / "b.jpg"))
    _write(str(tmp_path / "dog" / "c.JPEG"))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = data.ImageFolder(tmp_path, data.PretrainTransform(16))
    assert len(ds) == 3
    assert ds.classes == ["cat", "dog"]
    x, label = ds[1]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert sorted(ds.labels) == [0, 0, 1]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images found"):
        data.ImageFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.ImageFolder(tmp_path / "nope")
    with pytest.raises(NotADirectoryError):
        data.ImageFolder(tmp_path / "readme.txt")


def test_unreadable_image_is_skipped_with_a_warning_or_an_error(tmp_path):
    _write(str(tmp_path / "0_good.png"))
    (tmp_path / "1_bad.jpg").write_bytes(b"this is not a jpeg")
    _write(str(tmp_path / "2_good.png"), color=(0, 0, 255))
    ds = data.ImageFolder(tmp_path, data.PretrainTransform(8))
    with pytest.warns(UserWarning, match="skipping unreadable image .*1_bad.jpg"):
        x, _ = ds[1]
    assert x.shape == (3, 8, 8)
    with warnings.catch_warnings():  # warned once per file
        warnings.simplefilter("error")
        ds[1]
    strict = data.ImageFolder(tmp_path, data.PretrainTransform(8), on_bad_image="error")
    with pytest.raises(ValueError, match="cannot read image .*1_bad.jpg"):
        strict[1]
    with pytest.raises(ValueError, match="on_bad_image"):
        data.ImageFolder(tmp_path, on_bad_image="ignore")


def test_folder_of_only_broken_files_is_an_error(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"broken")
    ds = data.ImageFolder(tmp_path, data.PretrainTransform(8))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="unreadable images in a row"):
        ds[0]


def test_normalisation_matches_imagenet_mean_std():
    img = Image.new("RGB", (8, 8), (255, 0, 128))
    x = data.normalize(data.to_tensor(img))
    mean, std = torch.tensor(data.IMAGENET_DEFAULT_MEAN), torch.tensor(data.IMAGENET_DEFAULT_STD)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - mean) / std
    torch.testing.assert_close(x[:, 3, 4], expected)
    torch.testing.assert_close(data.denormalize(x), data.to_tensor(img))


def test_random_resized_crop_params_follow_torchvision():
    torch.manual_seed(0)
    for _ in range(200):
        i, j, h, w = data.random_resized_crop_params(100, 60, scale=(0.2, 1.0))
        assert 0 <= i and i + h <= 60 and 0 <= j and j + w <= 100
        assert 0.2 * 6000 * 0.9 <= h * w <= 6000
    # an extreme aspect ratio falls back to a centre crop within the ratio bounds
    torch.manual_seed(0)
    i, j, h, w = data.random_resized_crop_params(1000, 10, scale=(0.99, 1.0))
    assert h == 10 and w == round(10 * 4 / 3) and j == (1000 - w) // 2


def test_transform_is_seedable_and_flips():
    img = Image.linear_gradient("L").convert("RGB").resize((64, 48))
    t = data.PretrainTransform(16, scale=(1.0, 1.0), ratio=(64 / 48, 64 / 48), hflip=1.0)
    flipped = t(img)
    t0 = data.PretrainTransform(16, scale=(1.0, 1.0), ratio=(64 / 48, 64 / 48), hflip=0.0)
    torch.testing.assert_close(flipped, t0(img.transpose(Image.FLIP_LEFT_RIGHT)))
    t = data.PretrainTransform(16)
    torch.manual_seed(3)
    a = t(img)
    torch.manual_seed(3)
    torch.testing.assert_close(a, t(img))


def test_synthetic_and_demo_sets_are_deterministic(tmp_path):
    s = data.SyntheticImages(4, 16)
    assert s[2][0].shape == (3, 16, 16)
    torch.testing.assert_close(s[2][0], data.SyntheticImages(4, 16)[2][0])
    d1 = data.DemoShapes(3, size=32, seed=1)
    d2 = data.DemoShapes(3, size=32, seed=1)
    import numpy as np

    assert np.array_equal(np.asarray(d1[2][0]), np.asarray(d2[2][0]))
    paths = data.save_demo_images(tmp_path, 2, size=32)
    assert len(paths) == 2 and all(os.path.getsize(p) > 0 for p in paths)
    x = data.load_image(paths[0], 24)
    assert x.shape == (3, 24, 24)


def test_build_dataset_needs_a_source():
    with pytest.raises(ValueError, match="--data-path"):
        pretrain.build_dataset(data_path=None, input_size=16)
    assert len(pretrain.build_dataset(data_path=None, input_size=16, synthetic=5)) == 5
