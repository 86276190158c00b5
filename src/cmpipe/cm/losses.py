"""Training objectives: the EDM loss, the distances d, the consistency loss (eq. 7) of CD
(Algorithm 2) and CT (Algorithm 3), and the loss of Easy Consistency Tuning (ECT)."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from .karras import Sigmas, heun_step
from .schedules import ict_weight


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def edm_loss(denoiser, x: torch.Tensor, P_mean: float, P_std: float, sigma_data: float,
             generator: torch.Generator | None = None, part: slice | None = None) -> torch.Tensor:
    """EDM (Karras et al. 2022, eq. 2 + Table 1): ln sigma ~ N(P_mean, P_std^2),
    weight lambda = (sigma^2 + sd^2) / (sigma sd)^2, loss = lambda ||D(x + sigma n; sigma) - x||^2.

    x is the global batch; with `part` (a rank's rows under DDP) the noise is drawn for the
    global batch and the loss is the mean over the part's rows only.
    """
    b = x.shape[0]
    # Drawn on the CPU (where the training loop's seeded generator lives), then moved: the
    # same noise on every device.
    rnd = torch.randn(b, generator=generator)
    noise = torch.randn(x.shape, generator=generator)
    if part is not None:
        x, rnd, noise = x[part], rnd[part], noise[part]
    sigma = (rnd * P_std + P_mean).exp().to(x.device)
    noise = noise.to(x.device) * sigma.reshape(-1, 1, 1, 1)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    D = denoiser(x + noise, sigma)
    return (weight * mean_flat((D - x) ** 2)).mean()


def pseudo_huber_c(dim: int) -> float:
    """c = 0.00054 sqrt(d) (Song & Dhariwal 2023, section 3.3)."""
    return 0.00054 * math.sqrt(dim)


Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # d(x, y), one value per sample


def l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the pixels (as openai/consistency_models' l2)."""
    return (x - y).flatten(1).pow(2).mean(1)


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference over the pixels."""
    return (x - y).flatten(1).abs().mean(1)


@dataclass(frozen=True)
class PseudoHuber:
    """sqrt(||x - y||^2 + c^2) - c over the whole image (iCT, section 3.3); c = 0.00054 sqrt(dim)
    unless given."""
    c: float | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        diff = (x - y).flatten(1)
        c = pseudo_huber_c(diff.shape[1]) if self.c is None else self.c
        return (diff.pow(2).sum(1) + c**2).sqrt() - c


def pixel_distance(name: str, huber_c: float | None = None) -> Distance:
    """The distance called `name`: l2, l1 or pseudo_huber (with its c)."""
    if name == "l2":
        return l2
    if name == "l1":
        return l1
    if name == "pseudo_huber":
        return PseudoHuber(huber_c)
    raise ValueError(f"unknown distance {name!r}: use l2, l1, pseudo_huber or lpips")


@contextmanager
def rewound_rng(device: torch.device):
    """Run a block, then put the RNG (the CPU's, and `device`'s if CUDA) back where it was before
    it: the next forward of a network draws the dropout masks the block drew."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def consistency_loss(student, target, x_n: torch.Tensor, sigma_n: torch.Tensor,
                     x_next: torch.Tensor, sigma_next: torch.Tensor, distance: Distance,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """Consistency loss (Song et al. 2023, eq. 7 / Algorithm 2):
    lambda(sigma_n) d(f_theta(x_n, sigma_n), f_theta^-(x_next, sigma_next)), with sigma_next < sigma_n
    and no gradient through the target theta^-."""
    # The target sees the student's dropout mask: the RNG state is saved before the student's
    # forward and restored before the target's (openai/consistency_models' consistency_losses).
    with rewound_rng(x_n.device):
        pred = student(x_n, sigma_n)
    with torch.no_grad():
        tgt = target(x_next, sigma_next)
    d = distance(pred, tgt)
    if weight is not None:
        d = d * weight
    return d.mean()


@torch.no_grad()
def teacher_heun_pair(teacher, x: torch.Tensor, z: torch.Tensor, sigma_n: torch.Tensor,
                      sigma_next: torch.Tensor):
    """CD's pair (Algorithm 2): x_n = x + sigma_n z and one Heun step of the teacher to sigma_{n+1}."""
    x_n = x + sigma_n.reshape(-1, 1, 1, 1) * z
    return x_n, heun_step(teacher, x_n, sigma_n, sigma_next)


def cd_loss(student, target, n: torch.Tensor, x_n: torch.Tensor, x_next: torch.Tensor, sig: Sigmas,
            distance: Distance, weighting: str = "uniform") -> torch.Tensor:
    """lambda(sigma_n) d(f_theta(x_n, sigma_n), f_theta^-(x_hat_{n+1}, sigma_{n+1})).

    weighting 'uniform' is the paper's CD (lambda = 1); 'ict' is 1 / |sigma_n - sigma_{n+1}|.
    """
    grid = sig.grid().float().to(x_n.device)
    s_n, s_next = grid[n], grid[n + 1]
    weight = ict_weight(s_n, s_next) if weighting == "ict" else None
    return consistency_loss(student, target, x_n, s_n, x_next, s_next, distance, weight)


def cd_loss_online(student, target, teacher, x: torch.Tensor, n: torch.Tensor, z: torch.Tensor,
                   sig: Sigmas, distance: Distance, weighting: str = "uniform") -> torch.Tensor:
    """The same loss with the teacher's Heun step computed in the step (no cache)."""
    grid = sig.grid().float().to(x.device)
    x_n, x_next = teacher_heun_pair(teacher, x, z, grid[n], grid[n + 1])
    return cd_loss(student, target, n, x_n, x_next, sig, distance, weighting)


def ct_loss(student, target, x: torch.Tensor, z: torch.Tensor, n: torch.Tensor, sigmas: torch.Tensor,
            distance: Distance, weighting: str = "uniform") -> torch.Tensor:
    """lambda(sigma_n) d(f_theta(x + sigma_n z, sigma_n), f_theta^-(x + sigma_{n+1} z, sigma_{n+1}))."""
    s_n = sigmas[n].to(x)
    s_next = sigmas[n + 1].to(x)
    b = (-1,) + (1,) * (x.ndim - 1)
    weight = ict_weight(s_n, s_next) if weighting == "ict" else None
    return consistency_loss(student, target, x + s_n.reshape(b) * z, s_n, x + s_next.reshape(b) * z, s_next,
                            distance, weight)


def ect_loss(student, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
             c: float = 0.0) -> torch.Tensor:
    """Easy Consistency Tuning (Geng et al. 2025): the batch mean of
    (sqrt(||f_theta(x_t, t) - f_sg(theta)(x_r, r)||^2 + c^2) - c) / (t - r),
    x_t = x + t z and x_r = x + r z with one z. The target is the student itself without gradient,
    evaluated with the dropout mask of f_theta(x_t, t) (its RNG rewound), and x itself where r = 0.

    As locuslab/ect (training/loss.py, ECMLoss); where every r = 0 it skips the target's forward,
    here the forward always runs (no host synchronisation per step) and its rows are discarded.
    """
    b = (-1,) + (1,) * (x.ndim - 1)
    with rewound_rng(x.device):  # the target's forward below draws the same dropout mask
        pred = student(x + t.reshape(b) * z, t)
    with torch.no_grad():
        # Rows with r = 0 are evaluated at t instead and then replaced by x: the network's time
        # input ln(sigma) has no value at sigma = 0 (with denormals flushed, ln(0 + 1e-44) = -inf).
        r_eval = torch.where(r > 0, r, t)
        target = torch.where(r.reshape(b) > 0, student(x + r_eval.reshape(b) * z, r_eval), x)
    return (PseudoHuber(c)(pred, target) / (t - r)).mean()


def midtrain_loss(f, points: torch.Tensor, sigmas: torch.Tensor, end: torch.Tensor,
                  distance: Distance) -> torch.Tensor:
    """Consistency Mid-Training (CMT; Hu et al. 2026, section 3, the mid-training objective): the
    mean over trajectories b and points i of d(f_theta(x_hat_{t_i}, t_i), x_hat_{t_0}).

    points: B x P x C x H x W, trajectory b's points at the levels sigmas (P,) or (B, P), all above
    the boundary; end: B x C x H x W, each trajectory's clean end x_hat_{t_0}. f is the consistency
    function (boundary scalings), one forward over all B*P points in trajectory-major order (bind a
    class-conditional f to labels.repeat_interleave(P)); no weighting. As sony/cmt's
    DPMSolverLoss (which drops the last of the NFE+1 points), the point at t_0 itself does not
    enter: there f(x, sigma_min) = x = end and its d = 0 would only dilute the mean. Pass
    trajectory[:, :-1] with sigmas[:-1] and trajectory[:, -1]; a batch of 128 points is
    128/M trajectories x M points.
    """
    if points.ndim < 3 or points.shape[0] == 0 or points.shape[1] == 0:
        raise ValueError(f"points must be B x P x C x H x W with B, P >= 1, got {tuple(points.shape)}")
    b, p = points.shape[:2]
    if tuple(end.shape) != (b, *points.shape[2:]):
        raise ValueError(f"end has shape {tuple(end.shape)}; points {tuple(points.shape)} need one clean "
                         f"end per trajectory, {(b, *points.shape[2:])}")
    sigmas = torch.as_tensor(sigmas, device=points.device)
    if tuple(sigmas.shape) not in ((p,), (b, p)):
        raise ValueError(f"sigmas has shape {tuple(sigmas.shape)}; points {tuple(points.shape)} need ({p},) "
                         f"or ({b}, {p})")
    sigmas = sigmas.float().expand(b, p)
    sigma_min = getattr(f, "sigma_min", None)
    if sigma_min is not None and bool((sigmas <= sigma_min).any()):
        raise ValueError(f"sigmas reach the boundary sigma_min = {sigma_min} ({sigmas.min().item():g}), "
                         f"where f(x) = x: the clean end does not enter the CMT loss; pass the points "
                         f"before it (trajectory[:, :-1], sigmas[:-1])")
    pred = f(points.flatten(0, 1), sigmas.reshape(-1))
    target = end.unsqueeze(1).expand_as(points).flatten(0, 1).to(pred.dtype)
    return distance(pred, target).mean()
