"""The noise levels and ODE solvers of Karras et al. 2022 (EDM).

Conventions (docs/design.md §2): index 0 of the grid is sigma_max, the last
index is sigma_min; the probability-flow ODE in EDM's parametrisation is
dx/dsigma = (x - D(x; sigma)) / sigma.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Sigmas:
    """The noise-level settings shared by every stage (`diffusion` in params.yaml)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    num_scales: int = 18

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"diffusion.sigma_min ({self.sigma_min}) must be positive and below "
                             f"diffusion.sigma_max ({self.sigma_max})")
        if self.num_scales < 2:
            raise ValueError("diffusion.num_scales must be at least 2")

    def grid(self, n: int | None = None) -> torch.Tensor:
        return karras_sigmas(n or self.num_scales, self.sigma_min, self.sigma_max, self.rho)


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  dtype=torch.float64) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..n-1.

    EDM eq. 5; decreasing from sigma_max to sigma_min. Computed in float64 so the
    end points are exact; callers cast.
    """
    if n < 2:
        raise ValueError(f"karras_sigmas needs n >= 2 points, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + i / (n - 1) * (lo - hi)) ** rho
    s[0], s[-1] = sigma_max, sigma_min  # exact end points despite rounding
    return s.to(dtype)


def _bcast(sigma, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def euler_step(denoise: Denoise, x: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of the PF-ODE from sigma to sigma_next (1 NFE)."""
    s, s_next = _bcast(sigma, x), _bcast(sigma_next, x)
    d = (x - denoise(x, s.flatten())) / s
    return x + (s_next - s) * d


def heun_step(denoise: Denoise, x: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Heun step (EDM Algorithm 1, lines 5-8) from sigma to sigma_next > 0 (2 NFE)."""
    s, s_next = _bcast(sigma, x), _bcast(sigma_next, x)
    d = (x - denoise(x, s.flatten())) / s
    x_euler = x + (s_next - s) * d
    d_next = (x_euler - denoise(x_euler, s_next.flatten())) / s_next
    return x + (s_next - s) * 0.5 * (d + d_next)


def sample_heun(denoise: Denoise, noise: torch.Tensor, sig: Sigmas, steps: int) -> torch.Tensor:
    """EDM Algorithm 1 (deterministic): `steps` grid points then sigma = 0; NFE = 2*steps - 1.

    The last step goes to sigma = 0, where the Heun correction is skipped.
    """
    t = sig.grid(steps).to(noise.dtype) if steps >= 2 else torch.tensor([sig.sigma_max], dtype=noise.dtype)
    x = noise * t[0]
    for i in range(len(t)):
        if i + 1 < len(t):
            x = heun_step(denoise, x, t[i], t[i + 1])
        else:
            x = euler_step(denoise, x, t[i], 0.0)
    return x


def sample_euler(denoise: Denoise, noise: torch.Tensor, sig: Sigmas, nfe: int) -> torch.Tensor:
    """Euler with exactly `nfe` evaluations on the (nfe + 1)-point Karras grid whose last point,
    sigma_min, is replaced by 0: no evaluation is spent at sigma_min, where it would change
    nothing (nfe = 2 runs 80 -> 2.51 -> 0). With nfe = 1 this is D(sigma_max z; sigma_max).
    """
    t = sig.grid(nfe + 1).to(noise.dtype)
    t[-1] = 0.0
    x = noise * t[0]
    for i in range(nfe):
        x = euler_step(denoise, x, t[i], t[i + 1])
    return x


def clipped(denoise: Denoise) -> Denoise:
    """The denoiser with every estimate clipped to [-1, 1], as the official samplers do
    (openai/consistency_models' `clip_denoised=True`)."""
    return lambda x, sigma: denoise(x, sigma).clamp(-1, 1)


def heun_nfe_to_steps(nfe: int) -> int:
    if nfe < 1 or nfe % 2 == 0:
        raise ValueError(f"a Heun sampler has an odd NFE (2N - 1); got {nfe}: "
                         f"fix sample.teacher_heun_nfe")
    return (nfe + 1) // 2


def logsnr_sigmas(nfe: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  dtype=torch.float64) -> torch.Tensor:
    """The nfe + 1 noise levels of an nfe-step trajectory, uniform in logSNR, index 0 = sigma_max.

    CMT (Hu et al. 2026, section 3; sony/cmt DPMSolverLoss, DPM-Solver's skip_type 'logSNR'):
    with EDM's sigma the half-logSNR is lambda = -ln sigma, so
    ln sigma_i = ln sigma_max + i/nfe (ln sigma_min - ln sigma_max), i = 0..nfe. The last level is
    sigma_min (the trajectory's clean end), not 0. Float64 with exact end points; callers cast.
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"logsnr_sigmas needs nfe >= 1 (an integer number of solver steps), got {nfe!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"logsnr_sigmas needs 0 < sigma_min ({sigma_min}) < sigma_max ({sigma_max})")
    i = torch.arange(nfe + 1, dtype=torch.float64)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    s = (hi + i / nfe * (lo - hi)).exp()
    s[0], s[-1] = sigma_max, sigma_min  # exact end points despite rounding
    return s.to(dtype)
