"""What the edit stage measures zero-shot editing with: masks, trivial baselines and PSNR."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cmpipe.cm.editing import LUMA


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
    """The colorization baseline: the luma (cm.editing.LUMA weights), replicated on the three channels."""
    w = torch.tensor(LUMA, dtype=y.dtype, device=y.device).reshape(1, 3, 1, 1)
    return (y * w).sum(1, keepdim=True).expand_as(y)


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


def inpainting_masks(kind: str, n: int, height: int, width: int, seed: int, fraction: float) -> torch.Tensor:
    """n x 1 x H x W masks of edit.inpaint_mask: `centre` (one centred box), `random` (a box per
    image, placed by generator (seed, 0)) or the path of a PNG mask."""
    from cmpipe.util.seeding import seeded_generator

    if kind == "centre":
        return centre_box_mask(height, width, fraction).expand(n, 1, height, width)
    if kind == "random":
        return random_box_masks(n, height, width, seeded_generator(seed, 0), fraction)
    return load_mask_png(kind, height, width).expand(n, 1, height, width)


def load_stroke_png(path, channels: int, height: int, width: int) -> torch.Tensor:
    """1 x C x H x W stroke painting in [-1, 1] from an image file (edit.stroke_image), resized."""
    from pathlib import Path

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from cmpipe.util.images import to_unit

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"stroke image {path} not found (edit.stroke_image)")
    try:
        im = Image.open(path).convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"stroke image {path} cannot be read as an image ({e}); fix edit.stroke_image") from None
    arr = torch.from_numpy(np.asarray(im).copy()).reshape(height, width, channels).permute(2, 0, 1)[None]
    return to_unit(arr)
