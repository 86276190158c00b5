"""Multistep consistency sampling (Song et al. 2023, Algorithm 1), the one loop that sampling
and zero-shot editing (Algorithm 4, `editing.py`) share."""
from __future__ import annotations

from typing import Callable

import torch

from .karras import Sigmas


def default_ts(steps: int, num_scales: int) -> list[int]:
    """Evenly spaced grid indices [0, ...] for a `steps`-step sampler (when params give none)."""
    return [round(i * (num_scales - 1) / steps) for i in range(steps)]


def check_ts(ts: list[int], num_scales: int | None, what: str = "sample.ts", from_zero: bool = True):
    """The grid indices of a multistep run: increasing strictly, from 0 (sigma_max) unless `from_zero`
    is false (editing may start lower), within the `num_scales`-point grid when it is known."""
    last = "" if num_scales is None else f" up to at most {num_scales - 1} (the last index of the " \
        f"{num_scales}-point grid, diffusion.num_scales)"
    if (not ts or ts[0] < 0 or (from_zero and ts[0] != 0) or any(b <= a for a, b in zip(ts, ts[1:]))
            or (num_scales is not None and ts[-1] > num_scales - 1)):
        start = "start at 0 and " if from_zero else ""
        raise ValueError(f"{what} = {ts} must {start}increase strictly{last}")


@torch.no_grad()
def consistency_sample(f, noise: torch.Tensor, sig: Sigmas, ts: list[int],
                       renoise: Callable[[int], torch.Tensor], start: torch.Tensor | None = None,
                       project: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1).

    x = sigma_{ts[0]} z; x0 = f(x, sigma_{ts[0]}); for each further grid index t:
    x = x0 + sqrt(sigma_t^2 - eps^2) z_t, x0 = f(x, sigma_t). Each x0 is clipped to [-1, 1], as
    openai/consistency_models and diffusers do. `renoise(k)` gives the fresh noise z of step k >= 1.

    Zero-shot editing (Algorithm 4) is the same loop with two additions: `start`, an image that
    the first step noises (x = start + sigma_{ts[0]} z) instead of pure noise, and `project`,
    applied to every x0 to put the known part of the reference back.
    """
    grid = sig.grid()
    x0 = None
    for k, t in enumerate(ts):
        sigma = float(grid[t])
        if k == 0:
            x = noise * sigma if start is None else start + sigma * noise.to(start)
        else:
            x = x0 + (sigma**2 - sig.sigma_min**2) ** 0.5 * renoise(k).to(x0)
        x0 = f(x, torch.full((x.shape[0],), sigma, device=x.device)).clamp(-1, 1)
        if project is not None:
            x0 = project(x0)
    return x0
