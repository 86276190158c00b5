"""Consistency training (Song et al. 2023, Algorithm 3) and its improved form (Song & Dhariwal 2023).

No teacher: the pair shares one noise z, x_n = x + sigma_n z and x_hat_{n+1} = x + sigma_{n+1} z,
which is the one-step Euler solution of the PF-ODE with the ideal denoiser estimated by x itself.
Groundwork for `distill.mode: ct` (issue 3); not yet wired into a stage.
"""
from __future__ import annotations

import torch

from .losses import consistency_loss
from .schedules import ict_weight, lognormal_index_probs


def sample_pair_indices(sigmas: torch.Tensor, batch_size: int, generator: torch.Generator,
                        distribution: str = "uniform", P_mean: float = -1.1, P_std: float = 2.0) -> torch.Tensor:
    """n in 0..N-2 for a descending grid: uniform (CT, CD) or the discretised lognormal (iCT)."""
    num_pairs = len(sigmas) - 1
    if distribution == "uniform":
        return torch.randint(num_pairs, (batch_size,), generator=generator)
    if distribution == "lognormal":
        p = lognormal_index_probs(sigmas, P_mean, P_std)
        return torch.multinomial(p, batch_size, replacement=True, generator=generator)
    raise ValueError(f"unknown index distribution {distribution!r}: use uniform or lognormal")


def ct_loss(student, target, x: torch.Tensor, z: torch.Tensor, n: torch.Tensor, sigmas: torch.Tensor,
            metric: str, huber_c: float | None = None, weighting: str = "uniform") -> torch.Tensor:
    """lambda(sigma_n) d(f_theta(x + sigma_n z, sigma_n), f_theta^-(x + sigma_{n+1} z, sigma_{n+1}))."""
    s_n = sigmas[n].to(x)
    s_next = sigmas[n + 1].to(x)
    b = (-1,) + (1,) * (x.ndim - 1)
    weight = ict_weight(s_n, s_next) if weighting == "ict" else None
    return consistency_loss(student, target, x + s_n.reshape(b) * z, s_n, x + s_next.reshape(b) * z, s_next,
                            metric, huber_c, weight)
