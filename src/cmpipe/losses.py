"""Training objectives: the EDM loss and the consistency loss with its distances."""
from __future__ import annotations

import math

import torch

from .karras import heun_step


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


def resolve_metric(name: str, lpips_net: str = "alex", lpips_resize: int | None = 224, device="cpu"):
    """The distance d of `distill.metric`: its name for the pixel metrics, the frozen LPIPS
    network (offline weights, `cmpipe.lpips`) for 'lpips'."""
    if name != "lpips":
        return name
    from .lpips import load_lpips

    return load_lpips(lpips_net, resize=lpips_resize, device=device)


def distance(x: torch.Tensor, y: torch.Tensor, metric, huber_c: float | None = None) -> torch.Tensor:
    """Per-sample distance d(x, y).

    l2 and l1 are means over the pixels (as in openai/consistency_models);
    pseudo-Huber is sqrt(||x - y||^2 + c^2) - c over the whole image (iCT).
    A callable metric (the LPIPS network of `cmpipe.lpips`) is applied as it is.
    """
    if callable(metric):
        return metric(x, y)
    diff = (x - y).flatten(1)
    if metric == "l2":
        return diff.pow(2).mean(1)
    if metric == "l1":
        return diff.abs().mean(1)
    if metric == "pseudo_huber":
        c = pseudo_huber_c(diff.shape[1]) if huber_c is None else huber_c
        return (diff.pow(2).sum(1) + c**2).sqrt() - c
    raise ValueError(f"unknown metric {metric!r}: distill.metric must be l2, l1, pseudo_huber or an "
                     f"LPIPS network")


def consistency_loss(student, target, x_n: torch.Tensor, sigma_n: torch.Tensor,
                     x_next: torch.Tensor, sigma_next: torch.Tensor, metric: str,
                     huber_c: float | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Consistency loss (Song et al. 2023, eq. 7 / Algorithm 2):
    lambda(sigma_n) d(f_theta(x_n, sigma_n), f_theta^-(x_next, sigma_next)), with sigma_next < sigma_n
    and no gradient through the target theta^-."""
    pred = student(x_n, sigma_n)
    with torch.no_grad():
        tgt = target(x_next, sigma_next)
    d = distance(pred, tgt, metric, huber_c)
    if weight is not None:
        d = d * weight
    return d.mean()


@torch.no_grad()
def teacher_heun_pair(teacher, x: torch.Tensor, z: torch.Tensor, sigma_n: torch.Tensor,
                      sigma_next: torch.Tensor):
    """CD's pair (Algorithm 2): x_n = x + sigma_n z and one Heun step of the teacher to sigma_{n+1}."""
    x_n = x + sigma_n.reshape(-1, 1, 1, 1) * z
    return x_n, heun_step(teacher, x_n, sigma_n, sigma_next)
