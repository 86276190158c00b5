"""Discretisation and EMA schedules of consistency training (CT and improved CT).

Index convention of this project: grid index 0 is sigma_max, so a training pair
is (sigma_n, sigma_{n+1}) with sigma_n > sigma_{n+1}, n in 0..N-2.
"""
from __future__ import annotations

import math

import torch


def ct_num_scales(k: int, K: int, s0: int, s1: int) -> int:
    """N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1 (Song et al. 2023, Appendix C)."""
    if K < 1:
        raise ValueError("the number of training steps K must be at least 1")
    return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_mu(k: int, K: int, s0: int, s1: int, mu0: float) -> float:
    """mu(k) = exp(s0 ln(mu0) / N(k)) (the paper; openai's code divides by N(k) - 1)."""
    return math.exp(s0 * math.log(mu0) / ct_num_scales(k, K, s0, s1))


def ict_num_scales(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT curriculum: N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1)).

    Song & Dhariwal 2023, section 3.4: N doubles from s0 to s1 in equal stages.
    """
    stages = int(math.log2(s1 // s0)) + 1
    k_prime = max(1, K // stages)
    return min(s0 * 2 ** (k // k_prime), s1) + 1


def lognormal_index_probs(sigmas: torch.Tensor, P_mean: float = -1.1, P_std: float = 2.0) -> torch.Tensor:
    """p(n) of pair (sigma_n, sigma_{n+1}) for a descending grid, n = 0..N-2 (iCT, section 3.5).

    p(n) proportional to erf((ln sigma_n - P_mean)/(sqrt 2 P_std)) - erf((ln sigma_{n+1} - P_mean)/(sqrt 2 P_std)):
    the lognormal's mass between the two noise levels, normalised.
    """
    s = sigmas.double()
    cdf = torch.erf((s.log() - P_mean) / (math.sqrt(2) * P_std))
    p = cdf[:-1] - cdf[1:]
    return (p / p.sum()).float()


def ict_weight(sigma_n: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """lambda = 1 / |sigma_n - sigma_{n+1}| (iCT, section 3.2)."""
    return 1.0 / (sigma_n - sigma_next).abs()
