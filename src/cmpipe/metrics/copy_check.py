"""The copy check of a model trained on cached trajectories (CMT, Hu et al. 2026, with a cache):
the distance of each generated image to its nearest reference image (the cached clean ends, or
the training images), so that memorised references show up as distances near 0.

Distance: the per-pixel RMS difference in [-1, 1] pixel space, ||x - y||_2 / sqrt(C H W): the
same number at every resolution, and an offset of c in every pixel is a distance of c. Both sets
are compared as uint8 images (float references are quantised as sample sets are), so an exact
copy is at distance 0.
"""
from __future__ import annotations

import numpy as np
import torch

LAYOUTS = ("NHWC", "NCHW")


def as_uint8_nchw(images, layout: str, name: str) -> torch.Tensor:
    """`images` (uint8, or float in [-1, 1], N images in `layout`) as a uint8 N x C x H x W tensor."""
    if layout not in LAYOUTS:
        raise ValueError(f"{name}_layout must be one of {LAYOUTS}, got {layout!r}")
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim != 4:
        raise ValueError(f"{name} must be N images of 4 dimensions ({layout}), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: the copy check needs at least one image")
    x = x.detach().cpu()
    if layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x.contiguous()
    if not x.is_floating_point():
        raise ValueError(f"{name} must be uint8 or float in [-1, 1], got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds non-finite values")
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()


def _unit_rows(x_uint8: torch.Tensor, device) -> torch.Tensor:
    return x_uint8.to(device).flatten(1).float().div_(127.5).sub_(1.0)


@torch.no_grad()
def nearest_distances(samples, references, *, samples_layout: str, references_layout: str,
                      chunk: int = 1024, reference_chunk: int = 4096, device="cpu"):
    """(distance [N], index [N]) of each sample's nearest reference: per-pixel RMS in [-1, 1].

    Computed in blocks of `chunk` samples x `reference_chunk` references (torch.cdist over the
    flattened images; memory of one block, so 10k x 60k fits anywhere). The nearest one is found
    with cdist's matrix-product form and its distance then recomputed directly, so an exact copy
    gives exactly 0.
    """
    a = as_uint8_nchw(samples, samples_layout, "samples")
    b = as_uint8_nchw(references, references_layout, "references")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"samples are {tuple(a.shape[1:])} (C, H, W) images and references "
                         f"{tuple(b.shape[1:])}: the copy check compares images of one shape")
    for v, name in ((chunk, "chunk"), (reference_chunk, "reference_chunk")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    dim = a[0].numel()
    dist, index = torch.empty(len(a), dtype=torch.float64), torch.empty(len(a), dtype=torch.long)
    for s in range(0, len(a), chunk):
        x = _unit_rows(a[s:s + chunk], device)
        best = torch.full((len(x),), float("inf"), device=device)
        arg = torch.zeros(len(x), dtype=torch.long, device=device)
        for r in range(0, len(b), reference_chunk):
            d = torch.cdist(x, _unit_rows(b[r:r + reference_chunk], device))
            m, j = d.min(dim=1)
            better = m < best
            best = torch.where(better, m, best)
            arg = torch.where(better, j + r, arg)
        diff = a[s:s + chunk].flatten(1).double() - b[arg.cpu()].flatten(1).double()  # exact integers
        exact = diff.div_(127.5).pow_(2).sum(1).div_(dim).sqrt_()
        dist[s:s + len(x)], index[s:s + len(x)] = exact.cpu(), arg.cpu()
    return dist, index


def copy_summary(distances: torch.Tensor, reference_count: int) -> dict:
    """{median, mean, p10, min, count, reference_count} of nearest-reference distances."""
    d = torch.as_tensor(distances, dtype=torch.float64).flatten()
    if d.numel() == 0:
        raise ValueError("distances is empty: nothing to summarise")
    return {"median": float(d.quantile(0.5)),
            "mean": float(d.mean()), "p10": float(d.quantile(0.1)), "min": float(d.min()),
            "count": int(d.numel()), "reference_count": int(reference_count)}


def copy_check(samples, references, *, samples_layout: str = "NHWC", references_layout: str,
               chunk: int = 1024, reference_chunk: int = 4096, device="cpu") -> dict:
    """copy_summary of the samples' nearest-reference distances (samples as sample sets are stored:
    uint8 N x H x W x C; say how the references are laid out)."""
    d, _ = nearest_distances(samples, references, samples_layout=samples_layout,
                             references_layout=references_layout, chunk=chunk,
                             reference_chunk=reference_chunk, device=device)
    return copy_summary(d, len(references))
