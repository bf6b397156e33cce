"""A labelled variant of the demo images, for the demo's fine-tuning and linear probe.

Each image is drawn in the style of :func:`mae_fast.data.make_demo_image` (a two-colour gradient,
sometimes stripes or a checkerboard, flat-coloured shapes), but all its shapes (1 to 3) are of one
kind, and that kind is the label: 0 disc, 1 rectangle, 2 triangle. Colours, sizes, positions and
the background are random, so the class is the shape's outline only: an encoder that has learnt
edges and shapes (MAE pretraining on the demo images) separates the classes linearly better than
a random one.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .data import _pil

CLASSES = ("disc", "rectangle", "triangle")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    a = rng.uniform(0, 2 * np.pi)
    t = np.cos(a) * xx + np.sin(a) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = rng.uniform(0, 255, 3) * (1 - t[..., None]) + rng.uniform(0, 255, 3) * t[..., None]
    texture = rng.integers(0, 3)
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
    """One generated RGB image whose 1-3 shapes are all of kind ``CLASSES[label]``, near the centre
    (so that a crop of half the image or more keeps them)."""
    Image = _pil()
    from PIL import ImageDraw

    pil = Image.fromarray(_background(rng, size), "RGB")
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(1, 4))):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        r = rng.uniform(0.1, 0.25) * size
        if label == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif label == 1:
            w, h = r * rng.uniform(0.6, 1.3), r * rng.uniform(0.6, 1.3)
            draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=color)
        else:  # a triangle of three well-spread corners
            a0 = rng.uniform(0, 2 * np.pi)
            angles = a0 + np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, 3)
            draw.polygon([(cx + r * 1.3 * np.cos(a), cy + r * 1.3 * np.sin(a)) for a in angles], fill=color)
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
