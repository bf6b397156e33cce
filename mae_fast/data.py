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

import io
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
def to_mode(img, channels: int = 3):
    """A PIL image of any mode -> RGB (``channels=3``) or L (``channels=1``). 16- and 32-bit
    integer images (``I;16``, ``I``: 16-bit PNG/TIFF) are scaled to 8 bits (PIL's own ``convert``
    would clip them to white); float (``F``) ones are taken as 0-1 if their maximum is at most 1.
    CMYK, palette, LA/RGBA (alpha dropped) and grayscale go through PIL's ``convert``."""
    Image = _pil()
    want = "RGB" if channels == 3 else "L"
    if img.mode == want:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            top = 1.0 if arr.size and arr.max() <= 1.0 else 255.0
        else:
            top = 255.0 if arr.size and arr.max() <= 255 else 65535.0
        img = Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert(want)


def to_tensor(img, channels: int = 3) -> torch.Tensor:
    """PIL image -> float tensor (C, H, W) in [0, 1] (torchvision's ``ToTensor``)."""
    return to_uint8(img, channels).float().div_(255.0)


def to_uint8_hwc(img, channels: int = 3) -> torch.Tensor:
    """PIL image -> uint8 tensor (H, W, C), PIL's own layout: one copy, no transpose on the host."""
    arr = np.asarray(to_mode(img, channels))
    if not arr.flags.writeable:
        arr = np.array(arr)
    return torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1))


def to_uint8(img, channels: int = 3) -> torch.Tensor:
    """PIL image -> uint8 tensor (C, H, W): what the fast path sends to the device."""
    arr = np.asarray(to_mode(img, channels), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def normalize(x: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """(…, C, H, W) in [0, 1] -> normalised with mean/std (ImageNet's by default)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """Inverse of :func:`normalize` (no clamping)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x * s + m


def normalize_batch(x: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """A batch from the loader -> normalised float. uint8 batches (the fast path: 4x fewer bytes to
    pin and copy) are converted where they are, after the host-to-device copy, with exactly the
    float operations of ``to_tensor`` + ``normalize``, so the result is the same bit for bit; float
    batches (already normalised) pass through."""
    if x.dtype != torch.uint8:
        return x
    return normalize(x.float().div_(255.0), mean, std)


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


def draft_factor(w: int, h: int, size: int) -> int:
    """The largest JPEG DCT scale 1/k (k in 8, 4, 2, 1) at which a ``w`` x ``h`` crop still holds
    at least ``size`` pixels each way: decoding at that scale keeps the resize a downscale."""
    for k in (8, 4, 2):
        if w // k >= size and h // k >= size:
            return k
    return 1


class PretrainTransform:
    """RandomResizedCrop(size, scale, bicubic) + horizontal flip + ToTensor + Normalize (ImageNet's
    mean/std by default): the authors' pretraining augmentation.

    ``output="uint8"`` stops before the float conversion: the batch goes to the device as uint8 and
    :func:`normalize_batch` finishes there (bit-identical, 4x fewer bytes through the loader).
    ``draft=True`` decodes a JPEG at a reduced DCT scale (PIL's draft mode: 1/2, 1/4, 1/8) chosen
    so that the crop still holds at least ``size`` pixels each way, then resizes the scaled crop
    box: the same crop and flip draws as the exact path, the pixels differ slightly (measured in
    docs/pretraining.md). It applies to JPEGs not yet loaded (``ImageFolder(lazy=True)``); any
    other image takes the exact path."""

    def __init__(self, size: int, scale=(0.2, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), hflip: float = 0.5, *,
                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, channels: int = 3,
                 output: str = "float", draft: bool = False):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        if channels not in (1, 3) or len(mean) != channels or len(std) != channels:
            raise ValueError(f"channels must be 1 or 3 with as many mean/std values, got {channels}, {mean}, {std}")
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip
        self.mean, self.std, self.channels = tuple(mean), tuple(std), channels
        self.output, self.draft = output, draft

    def crop(self, img):
        """Draw the crop and the flip (the authors' order) and apply them: PIL image of ``size``."""
        Image = _pil()
        width, height = img.size
        i, j, h, w = random_resized_crop_params(width, height, self.scale, self.ratio)
        box = (j, i, j + w, i + h)
        k = draft_factor(w, h, self.size) if self.draft and getattr(img, "format", None) == "JPEG" \
            and not getattr(img, "_mae_loaded", False) else 1
        if k > 1:
            img.draft(img.mode, (width // k, height // k))
            sx, sy = img.size[0] / width, img.size[1] / height
            box = (j * sx, i * sy, (j + w) * sx, (i + h) * sy)
        img = to_mode(img, self.channels)
        img = img.resize((self.size, self.size), Image.BICUBIC, box=box)
        if torch.rand(1).item() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return img

    def finish(self, img) -> torch.Tensor:
        """The cropped PIL image -> uint8 tensor, or ToTensor + Normalize."""
        if self.output == "uint8":
            return to_uint8(img, self.channels)
        return normalize(to_tensor(img, self.channels), self.mean, self.std)

    def __call__(self, img) -> torch.Tensor:
        return self.finish(self.crop(img))

    def __repr__(self) -> str:
        return (f"PretrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
                f"mean={self.mean}, std={self.std}, output={self.output!r}, draft={self.draft})")


class DeviceAugmentTransform(PretrainTransform):
    """The crop + resize + flip moved to the device (``--augment device``): in the worker, decode and
    draw the crop and flip exactly as :class:`PretrainTransform` does (the same torch RNG calls in
    the same order); return the whole decoded image as uint8 in PIL's (H, W, C) layout (no
    transpose on the host) and the draws. :func:`collate_device`
    pads a batch to its largest image; :func:`device_augment` crops, resizes (bicubic, antialiased
    as PIL), flips and normalises the batch where it lands. The CPU then only reads and decodes."""

    def __call__(self, img):
        img = to_mode(img, self.channels)
        i, j, h, w = random_resized_crop_params(img.width, img.height, self.scale, self.ratio)
        flip = torch.rand(1).item() < self.hflip
        return to_uint8_hwc(img, self.channels), torch.tensor([i, j, h, w, int(flip)], dtype=torch.int32)


def collate_device(batch):
    """Collate ``((uint8 (H, W, C) image, draws), label[, skipped])`` samples: images stacked into
    the batch's largest size (the margins are left as they are: no crop reads them); returns
    ``((images (B, H, W, C), draws), labels[, skipped])``."""
    imgs = [b[0][0] for b in batch]
    hm, wm = max(x.shape[0] for x in imgs), max(x.shape[1] for x in imgs)
    out = torch.empty(len(imgs), hm, wm, imgs[0].shape[2], dtype=torch.uint8)
    for k, x in enumerate(imgs):
        out[k, :x.shape[0], :x.shape[1]] = x
    rest = [torch.tensor([b[i] for b in batch]) for i in range(1, len(batch[0]))]
    return ((out, torch.stack([b[0][1] for b in batch])), *rest)


def device_augment(images: torch.Tensor, draws: torch.Tensor, size: int, mean=IMAGENET_DEFAULT_MEAN,
                   std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """(B, H, W, C) uint8 images (on any device) and their (B, 5) crop/flip draws (on the CPU) ->
    the normalised (B, C, size, size) float batch: each crop resized with bicubic antialiasing
    (``F.interpolate(..., antialias=True)``, PIL's filter), rounded to uint8 levels as PIL's output
    is, flipped, normalised."""
    import torch.nn.functional as F

    out = torch.empty(images.shape[0], images.shape[3], size, size, device=images.device, dtype=torch.float32)
    for k, (i, j, h, w, flip) in enumerate(draws.tolist()):
        crop = images[k, i:i + h, j:j + w].permute(2, 0, 1)[None].float()
        r = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
        out[k] = r.flip(-1) if flip else r
    return normalize(out.round_().clamp_(0, 255).div_(255.0), mean, std)


def prepare_batch(samples, device, size: int, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """A loader batch -> the model's normalised float input on ``device``: a (images, draws) pair
    from :class:`DeviceAugmentTransform`, a uint8 batch, or a float one."""
    if isinstance(samples, (tuple, list)):
        images, draws = samples
        return device_augment(images.to(device, non_blocking=True), draws, size, mean, std)
    return normalize_batch(samples.to(device, non_blocking=True), mean, std)


class EvalTransform:
    """Resize the shorter side to ``resize`` (default ``size``; the authors' fine-tuning evaluation
    uses 256 for 224), bicubic, centre crop ``size``, ToTensor, Normalize."""

    def __init__(self, size: int, resize: int | None = None):
        self.size = size
        self.resize = resize or size

    def __call__(self, img) -> torch.Tensor:
        Image = _pil()
        img = img.convert("RGB")
        s = self.resize / min(img.width, img.height)
        w, h = max(self.resize, round(img.width * s)), max(self.resize, round(img.height * s))
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


_SIMPLEJPEG = None


def _simplejpeg():
    """The ``simplejpeg`` module (libjpeg-turbo; ``pip install 'mae_fast[fast]'``), or None."""
    global _SIMPLEJPEG
    if _SIMPLEJPEG is None:
        try:
            import simplejpeg
        except ImportError:
            simplejpeg = False
        _SIMPLEJPEG = simplejpeg
    return _SIMPLEJPEG or None


def jpeg_decoder(decoder: str = "auto") -> str:
    """The JPEG decoder ``decoder`` resolves to: ``simplejpeg`` when installed (auto), else ``pil``."""
    if decoder not in ("auto", "pil", "simplejpeg"):
        raise ValueError(f"decoder must be auto, pil or simplejpeg, got {decoder!r}")
    if decoder == "simplejpeg" and _simplejpeg() is None:
        raise ValueError("decoder simplejpeg asked for, but it is not installed: pip install 'mae_fast[fast]'")
    return "simplejpeg" if decoder != "pil" and _simplejpeg() is not None else "pil"


def decode_image(buf: bytes, *, lazy: bool = False, decoder: str = "auto"):
    """Image bytes -> PIL image. A baseline/progressive colour or gray JPEG is decoded with
    simplejpeg when it is installed (``decoder="auto"``): the same libjpeg-turbo, ISLOW DCT and fancy
    upsampling as PIL, so the same pixels (a test checks it), ~2x faster measured; anything else
    (CMYK, a file without its end marker, other formats, errors) goes to PIL. ``lazy``: PIL reads
    only the header (so that a transform may set JPEG draft mode first)."""
    Image = _pil()
    if not lazy and decoder != "pil" and buf[:2] == b"\xff\xd8" and buf.rstrip(b"\0")[-2:] == b"\xff\xd9":
        sj = _simplejpeg() if jpeg_decoder(decoder) == "simplejpeg" else None
        if sj is not None:
            try:
                if sj.decode_jpeg_header(buf)[2] in ("YCbCr", "RGB", "Gray"):  # not CMYK/YCCK: PIL's own rules
                    img = Image.fromarray(sj.decode_jpeg(buf, colorspace="RGB"), "RGB")
                    img._mae_loaded = True
                    return img
            except Exception:  # odd files: PIL decides
                pass
    img = Image.open(io.BytesIO(buf))
    if not lazy or img.format != "JPEG":
        img.load()
        img._mae_loaded = True
    return img


def open_image(path: str, *, lazy: bool = False, decoder: str = "auto"):
    """Read and decode an image file (see :func:`decode_image`)."""
    with open(path, "rb") as f:
        buf = f.read()
    return decode_image(buf, lazy=lazy, decoder=decoder)


class ImageFolder(torch.utils.data.Dataset):
    """Images under a folder (flat or with class sub-folders), read with PIL.

    ``__getitem__`` returns ``(tensor, label)`` like torchvision's ImageFolder, or with
    ``count_skipped=True`` ``(tensor, label, skipped)``, ``skipped`` the unreadable files passed
    over for this sample (summed by the training loop, also across DataLoader workers). Unreadable
    images: see the module docstring (``on_bad_image="skip"`` warns and substitutes, ``"error"``
    raises). ``lazy=True`` leaves JPEGs undecoded for the transform's draft mode; a decode error
    then surfaces in the transform and is handled the same way."""

    def __init__(self, root, transform: Callable | None = None, on_bad_image: str = "skip", *,
                 lazy: bool = False, count_skipped: bool = False, decoder: str = "auto"):
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        self.root = os.fspath(root)
        self.samples_paths, self.labels, self.classes = find_images(root)
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.lazy, self.count_skipped, self.decoder = lazy, count_skipped, jpeg_decoder(decoder)
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples_paths)

    def load(self, index: int):
        return open_image(self.samples_paths[index], lazy=self.lazy, decoder=self.decoder)

    def __getitem__(self, index: int):
        for attempt in range(MAX_BAD_IN_A_ROW):
            i = (index + attempt) % len(self)
            try:
                img = self.load(i)
                x = self.transform(img) if self.transform is not None else img
            except Exception as err:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
                path = self.samples_paths[i]
                if self.on_bad_image == "error":
                    raise ValueError(f"cannot read image {path!r}: {err} (--on-bad-image skip passes over "
                                     f"unreadable images)") from err
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f"skipping unreadable image {path!r} ({type(err).__name__}: {err})",
                                  stacklevel=2)
                continue
            return (x, self.labels[i], attempt) if self.count_skipped else (x, self.labels[i])
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
    draw_shapes(pil, rng, size)
    return pil


def draw_shapes(pil, rng: np.random.Generator, size: int) -> None:
    """1-4 flat-coloured discs, rectangles or triangles drawn on ``pil`` in place."""
    from PIL import ImageDraw

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


def parse_mean_std(text: str | None, channels: int, what: str) -> tuple[float, ...] | None:
    """``--mean``/``--std``: ``None`` (ImageNet's; for 1 channel the mean of ImageNet's three),
    ``data`` (measured: returns None, see :func:`measure_mean_std`), or 1 or ``channels`` numbers."""
    if text is None or text == "data":
        return None
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"--{what} takes {channels} numbers (comma-separated) or 'data', got {text!r}") from None
    if len(values) == 1:
        values = values * channels
    if len(values) != channels or (what == "std" and min(values) <= 0):
        raise ValueError(f"--{what} needs {channels} value(s){' > 0' if what == 'std' else ''}, got {text!r}")
    return values


def default_mean_std(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if channels == 3:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return (sum(IMAGENET_DEFAULT_MEAN) / 3,), (sum(IMAGENET_DEFAULT_STD) / 3,)


def measure_mean_std(data_path: str, channels: int = 3, n: int = 500, seed: int = 0,
                     size: int = 64) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``--mean data``: per-channel mean and std (in [0, 1] units) of up to ``n`` images of the
    folder drawn with a fixed seed, each resized to ``size`` x ``size`` (bicubic) first."""
    Image = _pil()
    paths = find_images(data_path)[0]
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(paths), size=min(n, len(paths)), replace=False)
    total, total_sq, count = np.zeros(channels), np.zeros(channels), 0
    for i in picked:
        try:
            img = to_mode(open_image(paths[i]), channels).resize((size, size), Image.BICUBIC)
        except Exception:  # unreadable: the loader will skip or stop on it
            continue
        arr = np.asarray(img, dtype=np.float64).reshape(-1, channels) / 255.0
        total += arr.sum(0)
        total_sq += (arr ** 2).sum(0)
        count += arr.shape[0]
    if not count:
        raise ValueError(f"--mean data: none of {len(picked)} sampled images under {data_path!r} could be read")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


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
    "SyntheticImages", "DemoShapes", "find_images", "load_image", "make_demo_image",
    "save_demo_images", "normalize", "denormalize", "random_resized_crop_params", "to_tensor", "to_uint8",
    "to_mode", "normalize_batch", "open_image", "draft_factor", "parse_mean_std", "measure_mean_std",
    "default_mean_std", "to_uint8_hwc", "decode_image", "jpeg_decoder", "DeviceAugmentTransform", "collate_device", "device_augment", "prepare_batch",
)
