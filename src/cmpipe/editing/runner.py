"""The edit stage's tasks on held-out images: zero-shot editing (Song et al. 2023, Algorithm 4,
`cm.editing`) with seeded noise, scored against the ground truth next to a trivial baseline.

Inpainting, colorization and super-resolution are scored by PSNR and LPIPS (baselines: mean
fill, gray replicated, bicubic up-sampling of the patch means); colorization is skipped, with
the reason, for gray data. Stroke-guided editing (SDEdit-style) and interpolation give grids
only. Each task draws its noise from its own stream of (seed, image index), so the results do
not depend on the batch size or on which other tasks run.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cmpipe.cm.editing import (
    Constraint,
    colorization,
    edit,
    inpainting,
    slerp,
    stroke_painting,
    super_resolution,
)
from cmpipe.cm.karras import Sigmas
from cmpipe.cm.sampling import check_ts, consistency_sample
from cmpipe.editing.tasks import (
    bicubic_upsample_means,
    gray_replicated,
    inpainting_masks,
    load_stroke_png,
    mean_fill,
    psnr,
)
from cmpipe.errors import ParamsError
from cmpipe.sampling.sets import bind_labels, class_labels
from cmpipe.util.images import save_grid, to_uint8
from cmpipe.util.seeding import per_sample_randn

SHOWN = 8  # rows of each grid
# The noise stream of each task, apart from the others' (per_sample_randn's stream argument).
STREAMS = {"inpainting": 1, "colorization": 2, "super_resolution": 3, "stroke": 4, "interpolation": 5}
SCORED = ("inpainting", "colorization", "super_resolution")
log = logging.getLogger(__name__)


def check_edit_params(e, sig: Sigmas, h: int, w: int):
    """Everything about params `edit` that can be known before loading a model (ParamsError)."""
    for name, ts in (("edit.ts", e.ts), ("edit.stroke_ts", e.stroke_ts)):
        try:
            check_ts(ts, sig.num_scales, name, from_zero=False)
        except ValueError as err:
            raise ParamsError(str(err)) from None
    if h % e.sr_factor or w % e.sr_factor:
        raise ParamsError(f"edit.sr_factor = {e.sr_factor} must divide the image size {h}x{w}")
    if e.inpaint_mask not in ("centre", "random") and not Path(e.inpaint_mask).is_file():
        raise ParamsError(f"edit.inpaint_mask = {e.inpaint_mask!r}: use centre, random or the path "
                          f"of a PNG mask (no such file)")
    if e.stroke_image is not None and not Path(e.stroke_image).is_file():
        raise ParamsError(f"edit.stroke_image = {e.stroke_image!r}: no such file")


def edit_with_seed(f, y: torch.Tensor, constraint: Constraint | None, sig: Sigmas, ts: list[int], seed: int,
                   stream: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """`cm.editing.edit` with the noise of image i drawn from (seed, i, stream, step): batch-size independent."""
    idx = range(len(y))
    return edit(f, y, constraint, sig, ts, lambda k: per_sample_randn(seed, idx, y.shape[1:], stream, k), start)


def scores(result: torch.Tensor, baseline: torch.Tensor, truth: torch.Tensor, lpips) -> dict:
    """PSNR and LPIPS of a task's result and of its baseline against the ground truth."""
    with torch.no_grad():
        return {"psnr": float(psnr(result, truth).mean()), "lpips": float(lpips(result, truth).mean()),
                "baseline_psnr": float(psnr(baseline, truth).mean()),
                "baseline_lpips": float(lpips(baseline, truth).mean())}


def rows_grid(columns: list[torch.Tensor], path: Path):
    """One row per example: the columns side by side (e.g. corrupted, baseline, result, truth)."""
    n = min(SHOWN, len(columns[0]))
    inter = torch.stack([col[:n] for col in columns], 1).flatten(0, 1)
    save_grid(to_uint8(inter), path, nrow=len(columns))


def run_edits(model, truth: torch.Tensor, labels: torch.Tensor | None, sig: Sigmas, e, out_dir: Path,
              lpips) -> dict:
    """Every editing task on `truth` (N×C×H×W in [-1, 1]) with the consistency function `model`,
    each image under its own class `labels` for a conditional model; grids go to `out_dir`.
    Returns metrics.json's content (params `edit`: ts, seed, the tasks' settings)."""
    n, c, h, w = truth.shape
    device = truth.device
    f = model.with_labels(labels.to(device) if model.num_classes else None)

    def run(name: str, y, constraint, ts=e.ts):
        return edit_with_seed(f, y, constraint, sig, ts, e.seed, STREAMS[name])

    metrics = {"count": n, "ts": e.ts}

    # Inpainting: A = I, the mask marks the pixels to generate.
    mask = inpainting_masks(e.inpaint_mask, n, h, w, e.seed, e.inpaint_fraction).to(device)
    result = run("inpainting", truth, inpainting(mask))
    baseline = mean_fill(truth, mask)
    metrics["inpainting"] = dict(scores(result, baseline, truth, lpips), mask=e.inpaint_mask, baseline="mean fill")
    shown_mask = torch.where(mask.bool().expand_as(truth), torch.ones_like(truth), truth)
    rows_grid([shown_mask, baseline, result, truth], out_dir / "inpainting.png")

    # Colorization: the luminance is kept, the chroma generated (RGB only).
    if c == 3:
        result = run("colorization", truth, colorization(3))
        baseline = gray_replicated(truth)
        metrics["colorization"] = dict(scores(result, baseline, truth, lpips), baseline="gray replicated")
        rows_grid([baseline, result, truth], out_dir / "colorization.png")
    else:
        metrics["colorization"] = {"skipped": "the data is gray (1 channel): there is no colour to generate"}
        log.info("colorization skipped: the data is gray")

    # Super-resolution: each patch mean is kept.
    result = run("super_resolution", truth, super_resolution(e.sr_factor, h, w))
    low = F.interpolate(F.avg_pool2d(truth, e.sr_factor), scale_factor=e.sr_factor, mode="nearest")
    baseline = bicubic_upsample_means(truth, e.sr_factor)
    metrics["super_resolution"] = dict(scores(result, baseline, truth, lpips), factor=e.sr_factor,
                                       baseline="bicubic up-sampling")
    rows_grid([low, baseline, result, truth], out_dir / "super_resolution.png")

    # Stroke-guided editing: a coarse painting noised to sigma_{stroke_ts[0]}, then denoised.
    if e.stroke_image is None:
        strokes = stroke_painting(truth, e.stroke_factor, e.stroke_levels)
    else:
        strokes = load_stroke_png(e.stroke_image, c, h, w).to(device).expand(n, c, h, w)
    result = run("stroke", strokes, None, e.stroke_ts)
    metrics["stroke"] = {"ts": e.stroke_ts, "source": e.stroke_image or f"{e.stroke_factor}x{e.stroke_factor} "
                         f"block means, {e.stroke_levels} levels"}
    rows_grid([strokes, result] + ([truth] if e.stroke_image is None else []), out_dir / "stroke.png")

    # Interpolation: slerp between two initial noises, each frame sampled in one step.
    idx = list(range(e.interp_pairs))
    z0, z1 = (per_sample_randn(e.seed, idx, (c, h, w), STREAMS["interpolation"], k).to(device) for k in (0, 1))
    f_pairs = bind_labels(model, class_labels(model.num_classes, e.seed), idx, device)
    frames = [consistency_sample(f_pairs, slerp(z0, z1, a), sig, [0], lambda k: None)
              for a in np.linspace(0, 1, e.interp_frames)]
    save_grid(to_uint8(torch.stack(frames, 1).flatten(0, 1)), out_dir / "interpolation.png", nrow=e.interp_frames)
    metrics["interpolation"] = {"pairs": e.interp_pairs, "frames": e.interp_frames}
    return metrics
