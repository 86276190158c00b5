"""DVC stage `edit`: zero-shot editing with the consistency model on held-out images.

    python -m stages.edit

Reads params `edit` and `diffusion`; inputs data/student/model.pt (evaluation EMA) and the
first `edit.count` images of the reference split in data/shards. Outputs reports/edit/:
one PNG grid per task and metrics.json. Inpainting, colorization and super-resolution
(Algorithm 4, `cmpipe.editing`) are scored by PSNR and LPIPS against the ground truth, next to
a trivial baseline (mean fill, gray replicated, bicubic up-sampling of the patch means);
colorization is skipped, with the reason in metrics.json, for gray data. Stroke-guided editing
(SDEdit-style) and interpolation give grids only.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from cmpipe.cm.editing import (
    colorization,
    inpainting,
    slerp,
    stroke_painting,
    super_resolution,
)
from cmpipe.cm.karras import Sigmas
from cmpipe.cm.precond import ConsistencyFunction
from cmpipe.cm.sampling import check_ts, consistency_sample
from cmpipe.data import load_image_split, read_manifest
from cmpipe.distributed.device import pick_device
from cmpipe.editing.tasks import (
    bicubic_upsample_means,
    centre_box_mask,
    gray_replicated,
    load_mask_png,
    mean_fill,
    psnr,
    random_box_masks,
)
from cmpipe.util.images import save_grid, to_uint8, to_unit
from cmpipe.models.networks import load_network
from cmpipe.pipeline import params
from cmpipe.pipeline.config import sigmas_from
from cmpipe.pipeline.layout import EDIT as OUT, MANIFEST, STUDENT
from cmpipe.pipeline.stage import run_stage
from cmpipe.sampling.sets import bind_labels, class_labels, edit_with_seed
from cmpipe.util.fileio import atomic_dir, atomic_write_json
from cmpipe.util.seeding import per_sample_randn, seeded_generator

SHOWN = 8  # rows of each grid
log = logging.getLogger("stages.edit")


def check(e, sig: Sigmas, c: int, h: int, w: int):
    """Everything that can be known before loading a model."""
    for name, ts in (("edit.ts", e.ts), ("edit.stroke_ts", e.stroke_ts)):
        try:
            check_ts(ts, sig.num_scales, name, from_zero=False)
        except ValueError as e:
            raise params.ParamsError(str(e)) from None
    if h % e.sr_factor or w % e.sr_factor:
        raise params.ParamsError(f"edit.sr_factor = {e.sr_factor} must divide the image size {h}x{w}")
    if e.inpaint_mask not in ("centre", "random") and not Path(e.inpaint_mask).is_file():
        raise params.ParamsError(f"edit.inpaint_mask = {e.inpaint_mask!r}: use centre, random or the path "
                                 f"of a PNG mask (no such file)")
    if e.stroke_image is not None and not Path(e.stroke_image).is_file():
        raise params.ParamsError(f"edit.stroke_image = {e.stroke_image!r}: no such file")


def scores(result, baseline, truth, lpips) -> dict:
    with torch.no_grad():
        return {"psnr": float(psnr(result, truth).mean()), "lpips": float(lpips(result, truth).mean()),
                "baseline_psnr": float(psnr(baseline, truth).mean()),
                "baseline_lpips": float(lpips(baseline, truth).mean())}


def rows_grid(columns: list[torch.Tensor], path: Path):
    """One row per example: the columns side by side (e.g. corrupted, baseline, result, truth)."""
    n = min(SHOWN, len(columns[0]))
    inter = torch.stack([col[:n] for col in columns], 1).flatten(0, 1)
    save_grid(to_uint8(inter), path, nrow=len(columns))


def main():
    p = params.load_many("edit", "diffusion")
    e, sig = p.edit, sigmas_from(p.diffusion)
    manifest = read_manifest(MANIFEST)
    c, h, w = manifest["shape"]
    check(e, sig, c, h, w)
    device = pick_device("auto")
    net, _ = load_network(STUDENT, ("consistency",), which="ema")
    model = ConsistencyFunction(net, sig.sigma_data, sig.sigma_min).to(device).eval()
    from cmpipe.metrics.lpips import load_lpips

    lpips = load_lpips("alex", resize=e.lpips_resize, device=device)
    truth_uint8, truth_labels = load_image_split(MANIFEST, role="ref", limit=e.count)
    truth = to_unit(truth_uint8).to(device)
    n = len(truth)
    # A class-conditional model edits each image under its own (true) class.
    f = model.with_labels(truth_labels.to(device) if model.num_classes else None)
    log.info("editing %d held-out images of %dx%dx%d with ts %s", n, c, h, w, e.ts)

    with atomic_dir(OUT) as tmp:
        metrics = {"count": n, "ts": e.ts}

        # Inpainting: A = I, the mask marks the pixels to generate.
        if e.inpaint_mask == "centre":
            mask = centre_box_mask(h, w, e.inpaint_fraction).expand(n, 1, h, w)
        elif e.inpaint_mask == "random":
            mask = random_box_masks(n, h, w, seeded_generator(e.seed, 0), e.inpaint_fraction)
        else:
            mask = load_mask_png(e.inpaint_mask, h, w).expand(n, 1, h, w)
        con = inpainting(mask.to(device))
        result = edit_with_seed(f, truth, con, sig, e.ts, e.seed, 1)
        baseline = mean_fill(truth, mask.to(device))
        metrics["inpainting"] = dict(scores(result, baseline, truth, lpips), mask=e.inpaint_mask,
                                     baseline="mean fill")
        shown_mask = torch.where(mask.to(device).bool().expand_as(truth), torch.ones_like(truth), truth)
        rows_grid([shown_mask, baseline, result, truth], tmp / "inpainting.png")

        # Colorization: the luminance is kept, the chroma generated (RGB only).
        if c == 3:
            con = colorization(3)
            result = edit_with_seed(f, truth, con, sig, e.ts, e.seed, 2)
            baseline = gray_replicated(truth)
            metrics["colorization"] = dict(scores(result, baseline, truth, lpips), baseline="gray replicated")
            rows_grid([baseline, result, truth], tmp / "colorization.png")
        else:
            metrics["colorization"] = {"skipped": "the data is gray (1 channel): there is no colour to generate"}
            log.info("colorization skipped: the data is gray")

        # Super-resolution: each patch mean is kept.
        con = super_resolution(e.sr_factor, h, w)
        result = edit_with_seed(f, truth, con, sig, e.ts, e.seed, 3)
        low = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(truth, e.sr_factor),
                                              scale_factor=e.sr_factor, mode="nearest")
        baseline = bicubic_upsample_means(truth, e.sr_factor)
        metrics["super_resolution"] = dict(scores(result, baseline, truth, lpips), factor=e.sr_factor,
                                           baseline="bicubic up-sampling")
        rows_grid([low, baseline, result, truth], tmp / "super_resolution.png")

        # Stroke-guided editing: a coarse painting noised to sigma_{stroke_ts[0]}, then denoised.
        if e.stroke_image is None:
            strokes = stroke_painting(truth, e.stroke_factor, e.stroke_levels)
        else:
            from PIL import Image

            im = Image.open(e.stroke_image).convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
            arr = torch.from_numpy(np.asarray(im).copy()).reshape(h, w, c).permute(2, 0, 1)[None]
            strokes = to_unit(arr).to(device).expand(n, c, h, w)
        result = edit_with_seed(f, strokes, None, sig, e.stroke_ts, e.seed, 4)
        metrics["stroke"] = {"ts": e.stroke_ts, "source": e.stroke_image or f"{e.stroke_factor}x{e.stroke_factor} "
                             f"block means, {e.stroke_levels} levels"}
        rows_grid([strokes, result] + ([truth] if e.stroke_image is None else []), tmp / "stroke.png")

        # Interpolation: slerp between two initial noises, each frame sampled in one step.
        idx = list(range(e.interp_pairs))
        z0 = per_sample_randn(e.seed, idx, (c, h, w), 5, 0).to(device)
        z1 = per_sample_randn(e.seed, idx, (c, h, w), 5, 1).to(device)
        f_pairs = bind_labels(model, class_labels(model.num_classes, e.seed), idx, device)
        frames = [consistency_sample(f_pairs, slerp(z0, z1, a), sig, [0], lambda k: None)
                  for a in np.linspace(0, 1, e.interp_frames)]
        save_grid(to_uint8(torch.stack(frames, 1).flatten(0, 1)), tmp / "interpolation.png", nrow=e.interp_frames)
        metrics["interpolation"] = {"pairs": e.interp_pairs, "frames": e.interp_frames}

        atomic_write_json(tmp / "metrics.json", metrics)
    for task in ("inpainting", "colorization", "super_resolution"):
        m = metrics[task]
        if "psnr" in m:
            log.info("%s: PSNR %.2f dB (baseline %.2f), LPIPS %.3f (baseline %.3f)", task, m["psnr"],
                     m["baseline_psnr"], m["lpips"], m["baseline_lpips"])
    log.info("wrote %s", OUT)


if __name__ == "__main__":
    run_stage("edit", main)
