"""Consistency training (Song et al. 2023, Algorithm 3) and its improved form (Song & Dhariwal 2023).

No teacher: the pair shares one noise z, x_n = x + sigma_n z and x_hat_{n+1} = x + sigma_{n+1} z,
which is the one-step Euler solution of the PF-ODE with the ideal denoiser estimated by x itself.
The stage `distill` runs it with `distill.mode: ct`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import load_image_split, read_manifest
from .distillation import ConsistencySetup
from .images import to_unit
from .karras import Sigmas
from .layout import MANIFEST
from .losses import consistency_loss
from .networks import ConsistencyFunction, build_unet, count_parameters, model_num_classes, unet_config
from .training import EpochSampler
from .schedules import ct_mu, ct_num_scales, ict_num_scales, ict_weight, lognormal_index_probs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CTSchedule:
    """N(k) and the target's EMA rate mu(k) over K training steps (params `distill.ct_*`, `ict_*`, `mu*`).

    num_scales: 'ct' (Song et al. 2023: N(k) from ct_s0 to ct_s1) or 'ict' (Song & Dhariwal 2023:
    N doubles from ict_s0 to ict_s1). mu_schedule: 'fixed' (mu; 0 is iCT's stop-gradient target)
    or 'ct' (mu(k) = exp(ct_s0 ln ct_mu0 / N(k))).
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
        if self.mu_schedule not in ("fixed", "ct"):
            raise ValueError(f"distill.mu_schedule = {self.mu_schedule!r}: use fixed or ct")

    @classmethod
    def from_params(cls, d, K: int) -> "CTSchedule":
        return cls(K, d.ct_num_scales, d.ct_s0, d.ct_s1, d.ct_mu0, d.ict_s0, d.ict_s1, d.mu_schedule, d.mu)

    def N(self, k: int) -> int:
        if self.num_scales == "ict":
            return ict_num_scales(k, self.K, self.ict_s0, self.ict_s1)
        return ct_num_scales(k, self.K, self.ct_s0, self.ct_s1)

    def mu_at(self, k: int) -> float:
        if self.mu_schedule == "ct":
            return ct_mu(k, self.K, self.ct_s0, self.ct_s1, self.ct_mu0)
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


def ct_loss(student, target, x: torch.Tensor, z: torch.Tensor, n: torch.Tensor, sigmas: torch.Tensor,
            metric: str, huber_c: float | None = None, weighting: str = "uniform") -> torch.Tensor:
    """lambda(sigma_n) d(f_theta(x + sigma_n z, sigma_n), f_theta^-(x + sigma_{n+1} z, sigma_{n+1}))."""
    s_n = sigmas[n].to(x)
    s_next = sigmas[n + 1].to(x)
    b = (-1,) + (1,) * (x.ndim - 1)
    weight = ict_weight(s_n, s_next) if weighting == "ict" else None
    return consistency_loss(student, target, x + s_n.reshape(b) * z, s_n, x + s_next.reshape(b) * z, s_next,
                            metric, huber_c, weight)


def ct_setup(d, sig: Sigmas, model_params, sched: CTSchedule, device, metric, part: slice | None = None,
             manifest_path: Path = MANIFEST) -> ConsistencySetup:
    """CT from the training images alone: the student starts from random weights (params `model`,
    seeded by distill.seed) and step k uses the N(k)-point grid of `sched`.

    Under torchrun the noise and pair indices are drawn for the global batch, and this rank
    keeps its rows (`part`): the loss does not depend on the world size.
    """
    manifest = read_manifest(manifest_path)
    c, h, _ = manifest["shape"]
    images, labels = load_image_split(manifest_path, role="train")
    num_classes = model_num_classes(model_params.class_conditional, manifest["class_names"])
    cfg_unet = unet_config(model_params.block_out_channels, model_params.layers_per_block,
                           model_params.attention_levels, model_params.dropout, h, c, num_classes)
    torch.manual_seed(d.seed)  # the initial weights
    student = ConsistencyFunction(build_unet(cfg_unet), sig.sigma_data, sig.sigma_min).to(device)
    log.info("ct: %d training images, a %.2fM-parameter student from random weights; N(k) %d -> %d, "
             "mu(k) %.4f -> %.4f", len(images), count_parameters(student) / 1e6, sched.N(0),
             sched.N(sched.K), sched.mu_at(0), sched.mu_at(sched.K))
    sampler = EpochSampler(len(images), d.batch_size, d.seed)

    def loss_at(step, g, target):
        sigmas = sig.grid(sched.N(step))
        i = sampler.indices(step)
        x = to_unit(images[i])
        z = torch.randn(x.shape, generator=g)  # drawn for the global batch, whatever the world size
        n = sample_pair_indices(sigmas, len(x), g, d.ct_index, d.ict_P_mean, d.ict_P_std)
        if part is not None:
            i, x, z, n = i[part], x[part], z[part], n[part]
        y = labels[i].to(device) if num_classes else None
        return ct_loss(student.with_labels(y), target.with_labels(y), x.to(device), z.to(device), n, sigmas,
                       metric, d.huber_c, d.weighting)

    inputs = [s["sha256"] for s in manifest["splits"][manifest["roles"]["train"]]["shards"]]
    return ConsistencySetup(student, cfg_unet, loss_at, inputs)
