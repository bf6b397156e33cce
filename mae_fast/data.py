"""Data for pretraining: an image folder, the authors' augmentation in plain torch + PIL (no
torchvision), a synthetic mode for throughput runs, and the procedurally generated demo set.

The authors' pretraining transform is::

    RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=BICUBIC)
    RandomHorizontalFlip()
    ToTensor()
    Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)

:class:`PretrainTransform` does the same with torchvision's crop-parameter algorithm (ten tries at a
random area and aspect ratio, then a centre crop), drawing from torch's global RNG as torchvision
does, so DataLoader workers get distinct, seedable streams.

Unreadable images: **skipped with a warning** by default (``on_bad_image="skip"``): the sample is
replaced by the next readable image of the folder and the file is named once in a warning; after
``MAX_BAD_IN_A_ROW`` unreadable files in a row it becomes an error (a folder of broken files is not
silently "trained" on). ``on_bad_image="error"`` raises at the first one, naming the file.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Sequence

import numpy as np
import torch

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_BAD_IN_A_ROW = 20


def _pil():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - pillow ships with matplotlib
        raise ImportError("reading images needs pillow: pip install pillow "
                          "(or pip install 'mae_fast[train]')") from err
    return Image


# ---------------------------------------------------------------------------- transforms
def to_tensor(img) -> torch.Tensor:
    """PIL RGB image -> float tensor (3, H, W) in [0, 1] (torchvision's ``ToTensor``)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """(…, 3, H, W) in [0, 1] -> normalised with ImageNet mean/std."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """Inverse of :func:`normalize` (no clamping)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x * s + m


def random_resized_crop_params(width: int, height: int, scale=(0.2, 1.0),
                               ratio=(3.0 / 4.0, 4.0 / 3.0)) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: ``(top, left, h, w)``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    # fallback to a central crop
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PretrainTransform:
    """RandomResizedCrop(size, scale, bicubic) + horizontal flip + ToTensor + ImageNet Normalize."""

    def __init__(self, size: int, scale=(0.2, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), hflip: float = 0.5):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip

    def __call__(self, img) -> torch.Tensor:
        Image = _pil()
        img = img.convert("RGB")
        i, j, h, w = random_resized_crop_params(img.width, img.height, self.scale, self.ratio)
        img = img.resize((self.size, self.size), Image.BICUBIC, box=(j, i, j + w, i + h))
        if torch.rand(1).item() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return normalize(to_tensor(img))

    def __repr__(self) -> str:
        return f"PretrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip})"


class EvalTransform:
    """Resize the shorter side to ``size`` (bicubic), centre crop, ToTensor, Normalize: for
    reconstructions of whole images."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img) -> torch.Tensor:
        Image = _pil()
        img = img.convert("RGB")
        s = self.size / min(img.width, img.height)
        w, h = max(self.size, round(img.width * s)), max(self.size, round(img.height * s))
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        return normalize(to_tensor(img))


# ---------------------------------------------------------------------------- datasets
def find_images(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """All image files under ``root`` (flat, class sub-folders, or deeper), sorted.
    Returns ``(paths, labels, classes)``; the label is the index of the top-level sub-folder
    (0 for files directly in ``root``). Labels are unused by pretraining."""
    root = os.fspath(root)
    if not os.path.exists(root):
        raise FileNotFoundError(f"data folder {root!r} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"data path {root!r} is not a folder (give a folder of images, "
                                 f"flat or with class sub-folders)")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(IMG_EXTENSIONS) and not name.startswith("."):
                paths.append(os.path.join(dirpath, name))
    if not paths:
        raise ValueError(f"no images found under {root!r} (looked for {', '.join(IMG_EXTENSIONS)}, "
                         f"in the folder and its sub-folders)")
    classes = sorted({os.path.relpath(p, root).split(os.sep)[0] for p in paths
                      if os.sep in os.path.relpath(p, root)})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index.get(os.path.relpath(p, root).split(os.sep)[0], 0) if os.sep in os.path.relpath(p, root) else 0
              for p in paths]
    return paths, labels, classes


class ImageFolder(torch.utils.data.Dataset):
    """Images under a folder (flat or with class sub-folders), read with PIL.

    ``__getitem__`` returns ``(tensor, label)`` like torchvision's ImageFolder. Unreadable images:
    see the module docstring (``on_bad_image="skip"`` warns and substitutes, ``"error"`` raises)."""

    def __init__(self, root, transform: Callable | None = None, on_bad_image: str = "skip"):
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        self.root = os.fspath(root)
        self.samples_paths, self.labels, self.classes = find_images(root)
        self.transform = transform
        self.on_bad_image = on_bad_image
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples_paths)

    def load(self, index: int):
        Image = _pil()
        path = self.samples_paths[index]
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
        return img.convert("RGB")

    def __getitem__(self, index: int):
        for attempt in range(MAX_BAD_IN_A_ROW):
            i = (index + attempt) % len(self)
            try:
                img = self.load(i)
            except Exception as err:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
                path = self.samples_paths[i]
                if self.on_bad_image == "error":
                    raise ValueError(f"cannot read image {path!r}: {err}") from err
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f"skipping unreadable image {path!r} ({type(err).__name__}: {err})",
                                  stacklevel=2)
                continue
            x = self.transform(img) if self.transform is not None else img
            return x, self.labels[i]
        raise ValueError(f"{MAX_BAD_IN_A_ROW} unreadable images in a row from "
                         f"{self.samples_paths[index]!r} on under {self.root!r}: is this an image folder?")


class SyntheticImages(torch.utils.data.Dataset):
    """``length`` normalised random images (3, size, size), the same for an index every time:
    for throughput runs where reading JPEGs must not be the bottleneck."""

    def __init__(self, length: int, size: int, in_chans: int = 3, seed: int = 0):
        if length <= 0:
            raise ValueError(f"synthetic dataset length must be positive, got {length}")
        self.length, self.size, self.in_chans, self.seed = length, size, in_chans, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(self.in_chans, self.size, self.size, generator=g), 0


# ---------------------------------------------------------------------------- demo images
def make_demo_image(rng: np.random.Generator, size: int = 96):
    """One procedurally generated RGB image: a smooth two-colour gradient background, optionally
    stripes or a checkerboard, and 1-4 flat-coloured shapes (discs, rectangles, triangles).
    Structured (edges, smooth regions, repeated textures), so a tiny MAE learns to fill it in
    within minutes on a CPU."""
    Image = _pil()
    from PIL import ImageDraw

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    texture = rng.integers(0, 3)
    if texture == 1:  # stripes
        period = rng.uniform(6, 20)
        a = rng.uniform(0, np.pi)
        s = np.sin(2 * np.pi * (np.cos(a) * xx + np.sin(a) * yy) * size / period) > 0
        img = np.where(s[..., None], img, img * 0.55 + 0.45 * rng.uniform(0, 255, 3))
    elif texture == 2:  # checkerboard
        cell = int(rng.integers(8, 24))
        s = ((np.arange(size)[:, None] // cell + np.arange(size)[None, :] // cell) % 2).astype(bool)
        img = np.where(s[..., None], img, 255 - img)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(1, 5))):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        r = rng.uniform(0.08, 0.3) * size
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif kind == 1:
            w, h = r * rng.uniform(0.6, 1.6), r * rng.uniform(0.6, 1.6)
            draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=color)
        else:
            pts = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in rng.uniform(0, 2 * np.pi, 3)]
            draw.polygon(pts, fill=color)
    return pil


class DemoShapes(torch.utils.data.Dataset):
    """``length`` procedurally generated images (see :func:`make_demo_image`) from a fixed seed,
    generated once in memory, then augmented by ``transform`` like an image folder."""

    def __init__(self, length: int = 2048, size: int = 96, seed: int = 0, transform: Callable | None = None):
        rng = np.random.default_rng(seed)
        self.images = [make_demo_image(rng, size) for _ in range(length)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = self.images[index]
        return (self.transform(img) if self.transform is not None else img), 0


def save_demo_images(folder: str | os.PathLike, n: int, size: int = 96, seed: int = 12345) -> list[str]:
    """Write ``n`` demo images (a seed apart from the training set's) as PNGs; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = os.path.join(os.fspath(folder), f"demo_{i:03d}.png")
        make_demo_image(rng, size).save(path)
        paths.append(path)
    return paths


def build_dataset(*, data_path: str | None, input_size: int, synthetic: int = 0, demo: int = 0,
                  on_bad_image: str = "skip", seed: int = 0) -> torch.utils.data.Dataset:
    """The training set: the demo shapes, synthetic images, or an image folder."""
    if demo:
        return DemoShapes(demo, size=max(96, input_size + input_size // 2), seed=seed,
                          transform=PretrainTransform(input_size))
    if synthetic:
        return SyntheticImages(synthetic, input_size, seed=seed)
    if not data_path:
        raise ValueError("give --data-path FOLDER (images, flat or in class sub-folders), or --synthetic N, or --demo")
    return ImageFolder(data_path, PretrainTransform(input_size), on_bad_image=on_bad_image)


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """One image file -> normalised (3, size, size) tensor (shorter side resized, centre crop)."""
    Image = _pil()
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except Exception as err:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {err}") from err
    return EvalTransform(size)(img)


__all__: Sequence[str] = (
    "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "PretrainTransform", "EvalTransform", "ImageFolder",
    "SyntheticImages", "DemoShapes", "build_dataset", "find_images", "load_image", "make_demo_image",
    "save_demo_images", "normalize", "denormalize", "random_resized_crop_params", "to_tensor",
)
