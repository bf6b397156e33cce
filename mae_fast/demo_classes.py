"""A labelled variant of the demo images, for the demo's fine-tuning and linear probe.

Each image is drawn as :func:`mae_fast.data.make_demo_image` draws the pretraining images (a
two-colour gradient, 1-4 flat-coloured discs, rectangles and triangles of random colour, size and
place), but the background's texture is chosen by the label: 0 plain gradient, 1 stripes, 2
checkerboard. Colours, periods, angles and the shapes on top vary, so the class is a texture seen
through occluding shapes. A random encoder already separates the textures fairly well (62% of
`linprobe --demo`), so the margin the pretrained encoder adds is what the demo measures; of the
labels tried on frozen features the shapes' kind and their number were near chance for both
encoders, and the stripes' orientation (stripes only, 4 bins) gave 53-62% against 31%.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .data import _pil, draw_shapes

CLASSES = ("plain", "stripes", "checkerboard")


def _background(rng: np.random.Generator, size: int, texture: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    a = rng.uniform(0, 2 * np.pi)
    t = np.cos(a) * xx + np.sin(a) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = rng.uniform(0, 255, 3) * (1 - t[..., None]) + rng.uniform(0, 255, 3) * t[..., None]
    if texture == 1:  # stripes, dimmed towards a random colour
        b = rng.uniform(0, np.pi)
        on = np.sin(2 * np.pi * (np.cos(b) * xx + np.sin(b) * yy) * size / rng.uniform(6, 20)) > 0
        img = np.where(on[..., None], img, img * 0.55 + 0.45 * rng.uniform(0, 255, 3))
    elif texture == 2:  # checkerboard, inverted cells
        cell = int(rng.integers(8, 24))
        on = ((np.arange(size)[:, None] // cell + np.arange(size)[None, :] // cell) % 2).astype(bool)
        img = np.where(on[..., None], img, 255 - img)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_labelled_image(rng: np.random.Generator, label: int, size: int = 96):
    """One generated RGB image with background texture ``CLASSES[label]`` under 1-4 random shapes."""
    Image = _pil()
    if label not in range(len(CLASSES)):
        raise ValueError(f"label must be in 0..{len(CLASSES) - 1}, got {label}")
    pil = Image.fromarray(_background(rng, size, label), "RGB")
    draw_shapes(pil, rng, size)
    return pil


class DemoClasses(torch.utils.data.Dataset):
    """``length`` labelled generated images (balanced classes in a seeded random order), generated
    once in memory; ``__getitem__`` returns ``(transform(img), label)``."""

    classes = CLASSES

    def __init__(self, length: int = 2048, size: int = 96, seed: int = 0, transform: Callable | None = None):
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        rng = np.random.default_rng(seed)
        self.labels = [int(v) for v in rng.permutation(np.arange(length) % len(CLASSES))]
        self.images = [make_labelled_image(rng, y, size) for y in self.labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = self.images[index]
        return (self.transform(img) if self.transform is not None else img), self.labels[index]
