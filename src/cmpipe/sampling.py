"""One-step and multistep consistency sampling, and the teacher's samplers, in batches.

All randomness of sample i comes from generators seeded with (seed, i, ...), so a
sample set does not depend on the batch size, and every sampler given the same
seed starts from the same initial noises (common random numbers make the sets
directly comparable).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from .images import to_uint8
from .karras import Sigmas, sample_euler, sample_heun
from .distributed import SINGLE, Dist, gather_in_order
from .training import seeded_generator


def per_sample_randn(seed: int, indices, shape, *stream: int) -> torch.Tensor:
    """Standard normal noise of `shape` for each global sample index, from (seed, index, *stream)."""
    return torch.stack([torch.randn(shape, generator=seeded_generator(seed, int(i), *stream))
                        for i in indices])


# The generator stream of a sample's class label, apart from its noises (streams 0, 1, 2, ...).
LABEL_STREAM = 1_000_003
Labels = Callable[[list[int]], torch.Tensor]


def class_labels(num_classes: int | None, seed: int, class_label: int | None = None) -> Labels | None:
    """The class of each global sample index for a conditional model, None for an unconditional one.

    `class_label` fixes one class for every sample; None draws each sample's class uniformly from
    (seed, index), so a set's classes, like its noises, do not depend on the batch size.
    """
    if num_classes is None:
        if class_label is not None:
            raise ValueError(f"a class ({class_label}) was asked for, but the model is unconditional "
                             f"(trained without model.class_conditional)")
        return None
    if class_label is not None:
        if not 0 <= class_label < num_classes:
            raise ValueError(f"class {class_label} is not one of the model's classes 0..{num_classes - 1}")
        return lambda idx: torch.full((len(idx),), int(class_label), dtype=torch.long)
    return lambda idx: torch.cat([torch.randint(num_classes, (1,), generator=seeded_generator(seed, int(i), LABEL_STREAM))
                                  for i in idx])


def class_rows(per_row: int) -> Labels:
    """Labels for a grid with one row per class: sample i gets class i // per_row."""
    return lambda idx: torch.tensor([int(i) // per_row for i in idx], dtype=torch.long)


def preview_plan(num_classes: int | None, per_row: int = 8) -> tuple[int, Labels | None]:
    """(count, labels) of a preview grid of `per_row` columns: 64 samples, or one row per class."""
    if num_classes is None:
        return 64, None
    return num_classes * per_row, class_rows(per_row)


def bind_labels(model, labels: Labels | None, idx, device):
    """`model` as a function of (x, sigma) with the labels of samples `idx` bound, if any."""
    return model if labels is None else model.with_labels(labels(idx).to(device))


def default_ts(steps: int, num_scales: int) -> list[int]:
    """Evenly spaced grid indices [0, ...] for a `steps`-step sampler (when params give none)."""
    return [round(i * (num_scales - 1) / steps) for i in range(steps)]


def check_ts(ts: list[int], num_scales: int, what: str = "sample.ts"):
    if not ts or ts[0] != 0 or any(b <= a for a, b in zip(ts, ts[1:])) or ts[-1] > num_scales - 1:
        raise ValueError(f"{what} = {ts} must start at 0 and increase strictly up to at most "
                         f"{num_scales - 1} (the last index of the {num_scales}-point grid, "
                         f"diffusion.num_scales)")


@torch.no_grad()
def consistency_sample(f, noise: torch.Tensor, sig: Sigmas, ts: list[int],
                       renoise: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1).

    x = sigma_max z; x0 = f(x, sigma_max); for each further grid index t:
    x = x0 + sqrt(sigma_t^2 - eps^2) z_t, x0 = f(x, sigma_t). Each x0 is clipped
    to [-1, 1], as openai/consistency_models and diffusers do. `renoise(k)` gives
    the fresh noise z of step k >= 1.
    """
    grid = sig.grid()
    x0 = None
    for k, t in enumerate(ts):
        sigma = float(grid[t])
        if k == 0:
            x = noise * sigma
        else:
            x = x0 + (sigma**2 - sig.sigma_min**2) ** 0.5 * renoise(k).to(x0)
        x0 = f(x, torch.full((x.shape[0],), sigma, device=x.device)).clamp(-1, 1)
    return x0


def generate(sample_batch: Callable[[torch.Tensor, list[int]], torch.Tensor], count: int,
             batch_size: int, shape, seed: int, device, desc: str, dist: Dist = SINGLE,
             parts_dir: Path | None = None) -> tuple[np.ndarray | None, float]:
    """Run `sample_batch(noise, indices)` over `count` samples; return uint8 N×H×W×C and s/image.

    Under torchrun (`dist`) batch b runs on rank b mod W and rank 0 returns all the images in
    order (the others return None); seconds per image are this rank's.
    """
    starts = list(range(0, count, batch_size))
    mine = dist.my_batches(len(starts))
    bar = tqdm(total=len(mine), desc=desc, unit="batch", mininterval=2.0)
    elapsed = 0.0

    def compute(b):
        nonlocal elapsed
        idx = list(range(starts[b], min(count, starts[b] + batch_size)))
        noise = per_sample_randn(seed, idx, shape).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = sample_batch(noise, idx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        bar.update()
        return to_uint8(x)

    out = list(gather_in_order(dist, len(starts), compute, parts_dir or Path("data/samples"), "samples"))
    bar.close()
    done = sum(min(count, starts[b] + batch_size) - starts[b] for b in mine)
    return (np.concatenate(out) if dist.is_main else None), elapsed / max(done, 1)


def cm_sampler(f, sig: Sigmas, ts: list[int], seed: int, shape, labels: Labels | None = None):
    def sample_batch(noise, idx):
        return consistency_sample(bind_labels(f, labels, idx, noise.device), noise, sig, ts,
                                  lambda k: per_sample_randn(seed, idx, shape, k))
    return sample_batch


def heun_sampler(denoise, sig: Sigmas, steps: int, labels: Labels | None = None):
    def sample_batch(noise, idx):
        with torch.no_grad():
            return sample_heun(bind_labels(denoise, labels, idx, noise.device), noise, sig, steps).clamp(-1, 1)
    return sample_batch


def euler_sampler(denoise, sig: Sigmas, nfe: int, labels: Labels | None = None):
    def sample_batch(noise, idx):
        with torch.no_grad():
            return sample_euler(bind_labels(denoise, labels, idx, noise.device), noise, sig, nfe).clamp(-1, 1)
    return sample_batch
