"""Zero-shot editing with a consistency model (Song et al. 2023, Algorithm 4 and Appendix D).

Every task is an invertible linear map A (orthogonal here, so A^-1 = A^T) and a mask Omega in
A's coordinates: Omega = 1 where the model generates, 0 where the reference y is known. The
multistep sampler alternates denoising and re-noising as in Algorithm 1, and after each
denoising puts the known part back:

    x0 <- A^-1[ (A y) * (1 - Omega) + (A x0) * Omega ]

so the result keeps the known coordinates of y exactly (up to float rounding):
  inpainting        A = I, Omega = the missing pixels;
  colorization      A = an orthogonal colour basis whose first axis is the luma vector
                    (0.2989, 0.5870, 0.1140), normalised, as openai's iterative_colorization;
                    Omega = the two chroma axes (RGB only);
  super-resolution  A = an orthogonal basis of each p x p patch whose first axis is the patch
                    mean direction (1, ..., 1)/p; Omega = every axis but the first;
  stroke editing    SDEdit-style: the stroke painting noised to an intermediate grid index, then
                    the same alternation with nothing known (Omega = 1);
  interpolation     spherical interpolation of two initial noises, each frame sampled alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .karras import Sigmas
from .sampling import consistency_sample


@dataclass
class Constraint:
    """A linear task: A (forward), A^-1 (inverse) and Omega (1 = generate, 0 = keep y)."""
    forward: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]
    omega: torch.Tensor

    def project(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A^-1[(A y)(1 - Omega) + (A x0) Omega]: x0 with the known part of y put back."""
        omega = self.omega.to(x0)
        return self.inverse(self.forward(y) * (1 - omega) + self.forward(x0) * omega)

    def corrupt(self, y: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """What the task sees of y: its known part, `fill` in A's coordinates elsewhere."""
        omega = self.omega.to(y)
        return self.inverse(self.forward(y) * (1 - omega) + fill * omega)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def inpainting(mask_missing: torch.Tensor) -> Constraint:
    """A = I; mask_missing is 1 on the pixels to generate (shape broadcastable to N x C x H x W)."""
    return Constraint(_identity, _identity, mask_missing.float())


def orthogonal_with_first(v: torch.Tensor) -> torch.Tensor:
    """An orthogonal matrix Q (rows = basis) whose first row is v / |v| (QR of [v | I])."""
    v = v.double().flatten()
    d = len(v)
    m = torch.cat([v[:, None], torch.eye(d, dtype=torch.float64)], dim=1)
    q, r = torch.linalg.qr(m)
    q = q[:, :d] * torch.sign(r.diagonal()[:d])  # fix signs so that the first column is +v/|v|
    return q.T.contiguous()


LUMA = (0.2989, 0.5870, 0.1140)  # ITU-R BT.601 luma weights, the grey level of an RGB image


def colorization(channels: int = 3) -> Constraint:
    """Keep the luma axis (LUMA, normalised) of an orthogonal colour basis; generate the rest."""
    if channels != 3:
        raise ValueError(f"colorization needs RGB images (3 channels), got {channels}: gray data "
                         "has no colour to generate")
    q = orthogonal_with_first(torch.tensor(LUMA)).float()

    def forward(x):
        return torch.einsum("ij,njhw->nihw", q.to(x), x)

    def inverse(c):
        return torch.einsum("ji,njhw->nihw", q.to(c), c)

    omega = torch.tensor([0.0, 1.0, 1.0]).reshape(1, 3, 1, 1)
    return Constraint(forward, inverse, omega)


def super_resolution(factor: int, height: int, width: int) -> Constraint:
    """Keep each factor x factor patch's mean (the first axis of an orthogonal patch basis)."""
    if factor < 2 or height % factor or width % factor:
        raise ValueError(f"super-resolution factor {factor} must be at least 2 and divide the image size "
                         f"{height}x{width}")
    p2 = factor * factor
    q = orthogonal_with_first(torch.ones(p2)).float()  # p2 x p2

    def patches(x):  # N C H W -> N C (H/p W/p) p2
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // factor, factor, w // factor, factor).permute(0, 1, 2, 4, 3, 5)
        return x.reshape(n, c, (h // factor) * (w // factor), p2)

    def unpatches(x, shape):
        n, c, h, w = shape
        x = x.reshape(n, c, h // factor, w // factor, factor, factor).permute(0, 1, 2, 4, 3, 5)
        return x.reshape(n, c, h, w)

    def forward(x):
        return patches(x) @ q.to(x).T

    def inverse(c):
        n, ch, k, _ = c.shape
        return unpatches(c @ q.to(c), (n, ch, height, width))

    omega = torch.ones(p2)
    omega[0] = 0.0
    return Constraint(forward, inverse, omega)


def edit(f, y: torch.Tensor, constraint: Constraint | None, sig: Sigmas, ts: list[int],
         noise: Callable[[int], torch.Tensor], start: torch.Tensor | None = None) -> torch.Tensor:
    """Algorithm 4: multistep consistency sampling on grid indices ts with the known part of y kept.

    start: the image noised at sigma_{ts[0]} (default: the corrupted y, as the paper); noise(k) gives
    z for step k (k = 0 noises the start). With constraint None nothing is kept (stroke editing).
    """
    known = constraint.corrupt(y) if constraint is not None else y
    project = None if constraint is None else (lambda x0: constraint.project(x0, y))
    return consistency_sample(f, noise(0), sig, ts, noise, start=known if start is None else start,
                              project=project)


def stroke_painting(images: torch.Tensor, factor: int, levels: int) -> torch.Tensor:
    """A coarse stroke painting of images in [-1, 1]: block means over factor x factor, colours
    quantised to `levels` per channel, blown up again (nearest)."""
    if levels < 2:
        raise ValueError(f"stroke colour levels must be at least 2, got {levels}")
    small = F.avg_pool2d(images, factor, ceil_mode=True)
    q = torch.round((small + 1) / 2 * (levels - 1)) / (levels - 1) * 2 - 1
    return F.interpolate(q, size=images.shape[-2:], mode="nearest")


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation of two noises (per sample), as the paper's interpolation."""
    a, b = z0.flatten(1), z1.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1)).reshape(-1, *([1] * (z0.ndim - 1)))
    if float(theta.min()) < 1e-6:
        return (1 - alpha) * z0 + alpha * z1
    return (torch.sin((1 - alpha) * theta) * z0 + torch.sin(alpha * theta) * z1) / torch.sin(theta)


