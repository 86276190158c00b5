"""One-step and multistep consistency sampling, and the teacher's samplers, in batches.

All randomness of sample i comes from generators seeded with (seed, i, ...), so a
sample set does not depend on the batch size, and every sampler given the same
seed starts from the same initial noises (common random numbers make the sets
directly comparable).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cmpipe.cm.karras import Denoise, Sigmas, clipped, sample_euler, sample_heun
from cmpipe.cm.sampling import consistency_sample
from cmpipe.distributed.ddp import SINGLE, Dist, gather_in_order
from cmpipe.sampling.dpm_solver import dpm_solver_trajectory, karras_grid_to_zero
from cmpipe.util.images import to_uint8
from cmpipe.util.seeding import per_sample_randn, seeded_generator

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


def generate(sample_batch: Callable[[torch.Tensor, list[int]], torch.Tensor], count: int,
             batch_size: int, shape, seed: int, device, desc: str, dist: Dist = SINGLE,
             parts_dir: Path | None = None) -> tuple[np.ndarray | None, float]:
    """Run `sample_batch(noise, indices)` over `count` samples; return uint8 N×H×W×C and s/image.

    Under torchrun (`dist`) batch b runs on rank b mod W and rank 0 returns all the images in
    order (the others return None); seconds per image are this rank's. The ranks pass their
    batches through a temporary folder beside `parts_dir` (the caller's output folder).
    """
    if dist.enabled and parts_dir is None:
        raise ValueError(f"generate {desc!r} under torchrun needs parts_dir, the output folder beside which "
                         f"the ranks leave their batches; pass the stage's output folder")
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

    out = list(gather_in_order(dist, len(starts), compute, parts_dir, "samples"))
    bar.close()
    done = sum(min(count, starts[b] + batch_size) - starts[b] for b in mine)
    return (np.concatenate(out) if dist.is_main else None), elapsed / max(done, 1)


def cm_sampler(f, sig: Sigmas, ts: list[int], seed: int, shape, labels: Labels | None = None):
    def sample_batch(noise, idx):
        return consistency_sample(bind_labels(f, labels, idx, noise.device), noise, sig, ts,
                                  lambda k: per_sample_randn(seed, idx, shape, k))
    return sample_batch


def teacher_denoiser(denoise, labels: Labels | None, idx, device, clip_denoised: bool):
    """The teacher's denoiser for samples `idx`; with `clip_denoised` every estimate D(x; sigma) inside
    every solver step is clipped to [-1, 1], as openai/consistency_models' samplers with clip_denoised=True."""
    d = bind_labels(denoise, labels, idx, device)
    return clipped(d) if clip_denoised else d


def heun_sampler(denoise, sig: Sigmas, steps: int, labels: Labels | None = None, clip_denoised: bool = False):
    def sample_batch(noise, idx):
        with torch.no_grad():
            d = teacher_denoiser(denoise, labels, idx, noise.device, clip_denoised)
            return sample_heun(d, noise, sig, steps).clamp(-1, 1)
    return sample_batch


def euler_sampler(denoise, sig: Sigmas, nfe: int, labels: Labels | None = None, clip_denoised: bool = False):
    def sample_batch(noise, idx):
        with torch.no_grad():
            d = teacher_denoiser(denoise, labels, idx, noise.device, clip_denoised)
            return sample_euler(d, noise, sig, nfe).clamp(-1, 1)
    return sample_batch


def sample_dpm_solver(denoise: Denoise, noise: torch.Tensor, sig: Sigmas, nfe: int) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) with exactly `nfe` evaluations of the EDM denoiser, by diffusers'
    `EDMDPMSolverMultistepScheduler` (`dpm_solver_trajectory`), on the grid of the Euler baseline
    (`karras_grid_to_zero`); the last step is first order, as the scheduler does. The start is EDM's
    x = sigma_max z, not diffusers' `init_noise_sigma` (sqrt(sigma_max^2 + 1)), so every sampler
    starts from the same point."""
    grid = karras_grid_to_zero(sig, nfe)
    return dpm_solver_trajectory(denoise, noise, grid, sig.sigma_data, x_start=noise * sig.sigma_max)[:, -1]


def dpm_sampler(denoise, sig: Sigmas, nfe: int, labels: Labels | None = None, clip_denoised: bool = False):
    def sample_batch(noise, idx):
        with torch.no_grad():
            d = teacher_denoiser(denoise, labels, idx, noise.device, clip_denoised)
            return sample_dpm_solver(d, noise, sig, nfe).clamp(-1, 1)
    return sample_batch

