"""Discretisation and EMA schedules of consistency training (CT and improved CT).

Index convention of this project: grid index 0 is sigma_max, so a training pair
is (sigma_n, sigma_{n+1}) with sigma_n > sigma_{n+1}, n in 0..N-2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def ct_num_scales(k: int, K: int, s0: int, s1: int) -> int:
    """N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1 (Song et al. 2023, Appendix C)."""
    if K < 1:
        raise ValueError("the number of training steps K must be at least 1")
    return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_mu(k: int, K: int, s0: int, s1: int, mu0: float, formula: str = "code") -> float:
    """The target's EMA rate of original CT.

    formula 'paper': mu(k) = exp(s0 ln(mu0) / N(k)) (Song et al. 2023, Appendix C).
    formula 'code': exp(s0 ln(mu0) / max(N(k) - 1, 1)), as openai/consistency_models'
    `create_ema_and_scales_fn` computes it (before its `scales + 1`): the code behind the published
    CT numbers. At k = 0 with s0 = 2, mu0 = 0.95 it gives 0.9025 where the paper's gives 0.95.
    """
    n = ct_num_scales(k, K, s0, s1)
    if formula == "code":
        return math.exp(s0 * math.log(mu0) / max(n - 1, 1))
    if formula == "paper":
        return math.exp(s0 * math.log(mu0) / n)
    raise ValueError(f"unknown mu(k) formula {formula!r}: use code or paper")


def ict_num_scales(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT curriculum: N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1)).

    Song & Dhariwal 2023, section 3.4: N doubles from s0 to s1 in equal stages.
    """
    stages = math.log2(s1 // s0) + 1  # not floored: for s1/s0 = 100 that is 7.64 stages, not 7
    k_prime = max(1, math.floor(K / stages))
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


@dataclass(frozen=True)
class CTSchedule:
    """N(k) and the target's EMA rate mu(k) over K training steps (params `distill.ct_*`, `ict_*`, `mu*`).

    num_scales: 'ct' (Song et al. 2023: N(k) from ct_s0 to ct_s1) or 'ict' (Song & Dhariwal 2023:
    N doubles from ict_s0 to ict_s1). mu_schedule: 'fixed' (mu; 0 is iCT's stop-gradient target),
    'ct' (openai's code: mu(k) = exp(ct_s0 ln ct_mu0 / (N(k) - 1))) or 'ct_paper' (the paper's
    exp(ct_s0 ln ct_mu0 / N(k))); see `ct_mu`.
    """
    K: int
    num_scales: str = "ct"
    ct_s0: int = 2
    ct_s1: int = 150
    ct_mu0: float = 0.9
    ict_s0: int = 10
    ict_s1: int = 1280
    mu_schedule: str = "fixed"
    mu: float = 0.0

    def __post_init__(self):
        if self.ct_s1 <= self.ct_s0:
            raise ValueError(f"distill.ct_s1 = {self.ct_s1} must exceed distill.ct_s0 = {self.ct_s0}")
        if self.ict_s1 < self.ict_s0:
            raise ValueError(f"distill.ict_s1 = {self.ict_s1} must be at least distill.ict_s0 = {self.ict_s0}")
        if self.num_scales not in ("ct", "ict"):
            raise ValueError(f"distill.ct_num_scales = {self.num_scales!r}: use ct or ict")
        if self.mu_schedule not in ("fixed", "ct", "ct_paper"):
            raise ValueError(f"distill.mu_schedule = {self.mu_schedule!r}: use fixed, ct or ct_paper")

    def N(self, k: int) -> int:
        if self.num_scales == "ict":
            return ict_num_scales(k, self.K, self.ict_s0, self.ict_s1)
        return ct_num_scales(k, self.K, self.ct_s0, self.ct_s1)

    def mu_at(self, k: int) -> float:
        if self.mu_schedule in ("ct", "ct_paper"):
            formula = "code" if self.mu_schedule == "ct" else "paper"
            return ct_mu(k, self.K, self.ct_s0, self.ct_s1, self.ct_mu0, formula)
        return self.mu


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


# --- Easy Consistency Tuning (ECT; Geng et al., "Consistency Models Made Easy", ICLR 2025) ---

def ect_sample_t(batch: int, generator: torch.Generator | None = None, P_mean: float = -1.1,
                 P_std: float = 2.0) -> torch.Tensor:
    """ln t ~ N(P_mean, P_std^2) (ECT, section 3; EDM's lognormal with iCT's P_mean, P_std)."""
    return (torch.randn(batch, generator=generator) * P_std + P_mean).exp()


def ect_r(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0,
          mapping: str = "sigmoid") -> torch.Tensor:
    """ECT's mapping r(t): r = max(t (1 - q^-(s+1) n(t)), 0), n(t) = 1 + k sigmoid(-b t) ('sigmoid')
    or 1 ('const'); stage s = floor(iteration / d), so t - r shrinks by q every stage.

    The exponent s + 1 with s = floor(iteration / d) (stage 0 already has t - r = t n(t) / q) and
    the clamp at 0 follow locuslab/ect (training/loss.py, t_to_r_sigmoid and update_schedule).
    """
    if mapping == "sigmoid":
        n = 1 + k * torch.sigmoid(-b * t)
    elif mapping == "const":
        n = torch.ones_like(t)
    else:
        raise ValueError(f"unknown ECT mapping {mapping!r}: use sigmoid or const")
    return (t * (1 - q ** -(stage + 1) * n)).clamp(min=0)
