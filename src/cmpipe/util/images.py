"""Conversions between stored uint8 images and the model's [-1, 1] floats, and PNG grids."""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from cmpipe.util.fileio import atomic_write_bytes


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 N×C×H×W in [0, 255] -> float32 in [-1, 1]."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float N×C×H×W in [-1, 1] -> uint8 N×H×W×C (the storage layout of sample sets)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid_image(images_hwc: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 N×H×W×C images into one uint8 image with `pad` pixels of white between."""
    n, h, w, c = images_hwc.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images_hwc[i]
    return out


def save_grid(images_hwc: np.ndarray, path, nrow: int | None = None, scale: int = 2):
    """Write a PNG grid (upscaled `scale`x with nearest neighbours so small images stay legible)."""
    g = grid_image(images_hwc, nrow)
    img = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    atomic_write_bytes(path, buf.getvalue())


def class_rows(images_hwc: np.ndarray, labels: np.ndarray, num_classes: int, per_row: int = 8) -> np.ndarray:
    """The first `per_row` images of each class, one row per class (white where a class has fewer)."""
    n, h, w, c = images_hwc.shape
    out = np.full((num_classes * per_row, h, w, c), 255, np.uint8)
    for k in range(num_classes):
        picked = np.flatnonzero(labels == k)[:per_row]
        out[k * per_row:k * per_row + len(picked)] = images_hwc[picked]
    return out
