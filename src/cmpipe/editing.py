"""Zero-shot editing with a consistency model (Song et al. 2023, Algorithm 4 and Appendix D).

Every task is an invertible linear map A (orthogonal here, so A^-1 = A^T) and a mask Omega in
A's coordinates: Omega = 1 where the model generates, 0 where the reference y is known. The
multistep sampler alternates denoising and re-noising as in Algorithm 1, and after each
denoising puts the known part back:

    x0 <- A^-1[ (A y) * (1 - Omega) + (A x0) * Omega ]

so the result keeps the known coordinates of y exactly (up to float rounding):
  inpainting        A = I, Omega = the missing pixels;
  colorization      A = an orthogonal colour basis whose first axis is the luminance
                    (1, 1, 1)/sqrt(3); Omega = the two chroma axes (RGB only);
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


def colorization(channels: int = 3) -> Constraint:
    """Keep the luminance axis (1, 1, 1)/sqrt 3 of an orthogonal colour basis; generate the rest."""
    if channels != 3:
        raise ValueError(f"colorization needs RGB images (3 channels), got {channels}: gray data "
                         "has no colour to generate")
    q = orthogonal_with_first(torch.ones(3)).float()

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


@torch.no_grad()
def edit(f, y: torch.Tensor, constraint: Constraint | None, sig: Sigmas, ts: list[int],
         noise: Callable[[int], torch.Tensor], start: torch.Tensor | None = None) -> torch.Tensor:
    """Algorithm 4: multistep consistency sampling on grid indices ts with the known part of y kept.

    start: the image noised at sigma_{ts[0]} (default: the corrupted y, as the paper); noise(k) gives
    z for step k (k = 0 noises the start). With constraint None nothing is kept (stroke editing).
    """
    grid = sig.grid()
    known = constraint.corrupt(y) if constraint is not None else y
    x0 = known if start is None else start
    for k, t in enumerate(ts):
        sigma = float(grid[t])
        scale = sigma if k == 0 else (sigma**2 - sig.sigma_min**2) ** 0.5
        x = x0 + scale * noise(k).to(x0)
        x0 = f(x, torch.full((x.shape[0],), sigma, device=x.device)).clamp(-1, 1)
        if constraint is not None:
            x0 = constraint.project(x0, y)
    return x0


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


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)


def bicubic_upsample_means(y: torch.Tensor, factor: int) -> torch.Tensor:
    """The super-resolution baseline: the patch means blown up with bicubic interpolation."""
    small = F.avg_pool2d(y, factor)
    return F.interpolate(small, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)


def mean_fill(y: torch.Tensor, mask_missing: torch.Tensor) -> torch.Tensor:
    """The inpainting baseline: missing pixels set to the mean of each image's known pixels."""
    m = mask_missing.to(y).expand_as(y)
    known = (1 - m)
    mean = (y * known).flatten(1).sum(1) / known.flatten(1).sum(1).clamp_min(1)
    return y * known + mean.reshape(-1, 1, 1, 1) * m


def gray_replicated(y: torch.Tensor) -> torch.Tensor:
    """The colorization baseline: the luminance, replicated on the three channels."""
    return y.mean(1, keepdim=True).expand_as(y)


def centre_box_mask(height: int, width: int, fraction: float = 0.5) -> torch.Tensor:
    """1 x 1 x H x W mask, 1 on a centred box covering `fraction` of each side."""
    m = torch.zeros(1, 1, height, width)
    bh, bw = max(1, round(height * fraction)), max(1, round(width * fraction))
    top, left = (height - bh) // 2, (width - bw) // 2
    m[..., top:top + bh, left:left + bw] = 1
    return m


def random_box_masks(n: int, height: int, width: int, generator: torch.Generator,
                     fraction: float = 0.4) -> torch.Tensor:
    """n x 1 x H x W masks, each a box of `fraction` of each side at a random place."""
    bh, bw = max(1, round(height * fraction)), max(1, round(width * fraction))
    m = torch.zeros(n, 1, height, width)
    tops = torch.randint(0, height - bh + 1, (n,), generator=generator)
    lefts = torch.randint(0, width - bw + 1, (n,), generator=generator)
    for i, (t, l) in enumerate(zip(tops.tolist(), lefts.tolist())):
        m[i, :, t:t + bh, l:l + bw] = 1
    return m


def load_mask_png(path, height: int, width: int) -> torch.Tensor:
    """1 x 1 x H x W mask from a PNG: white (> 127 after conversion to gray) = generate."""
    from pathlib import Path

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask image {path} not found (edit.inpaint_mask)")
    try:
        im = Image.open(path).convert("L").resize((width, height), Image.NEAREST)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"mask image {path} cannot be read as an image ({e})") from None
    m = torch.from_numpy((np.asarray(im) > 127).astype("float32"))[None, None]
    if m.sum() == 0:
        raise ValueError(f"mask image {path} has no white pixel: nothing to inpaint")
    return m


def edit_with_seed(f, y: torch.Tensor, constraint: Constraint | None, sig: Sigmas, ts: list[int], seed: int,
                   stream: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """`edit` with the noise of image i drawn from (seed, i, stream, step): batch-size independent."""
    from .sampling import per_sample_randn

    idx = range(len(y))
    return edit(f, y, constraint, sig, ts, lambda k: per_sample_randn(seed, idx, y.shape[1:], stream, k), start)
