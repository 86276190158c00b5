"""DVC stage `edit`: zero-shot editing with the consistency model on held-out images.

    python -m stages.edit

Reads params `edit` and `diffusion`; inputs data/student/model.pt (evaluation EMA) and the
first `edit.count` images of the reference split in data/shards. Outputs reports/edit/:
one PNG grid per task and metrics.json. The tasks (Algorithm 4: inpainting, colorization,
super-resolution scored by PSNR and LPIPS next to a trivial baseline; stroke-guided editing and
interpolation as grids) are `cmpipe.editing.runner`.
"""
from __future__ import annotations

import logging

from cmpipe.cm.precond import ConsistencyFunction
from cmpipe.data import load_image_split, read_manifest
from cmpipe.distributed.device import pick_device
from cmpipe.editing.runner import SCORED, check_edit_params, run_edits
from cmpipe.metrics.lpips import load_lpips
from cmpipe.models.networks import load_network
from cmpipe.pipeline import params
from cmpipe.pipeline.config import sigmas_from
from cmpipe.pipeline.layout import EDIT as OUT, MANIFEST, STUDENT
from cmpipe.pipeline.stage import run_stage
from cmpipe.util.fileio import atomic_dir, atomic_write_json
from cmpipe.util.images import to_unit

log = logging.getLogger("stages.edit")


def main():
    p = params.load_many("edit", "diffusion")
    e, sig = p.edit, sigmas_from(p.diffusion)
    c, h, w = read_manifest(MANIFEST)["shape"]
    check_edit_params(e, sig, h, w)
    device = pick_device("auto")
    net, _ = load_network(STUDENT, ("consistency",), which="ema")
    model = ConsistencyFunction(net, sig.sigma_data, sig.sigma_min).to(device).eval()
    lpips = load_lpips("alex", resize=e.lpips_resize, device=device)
    truth_uint8, truth_labels = load_image_split(MANIFEST, role="ref", limit=e.count)
    truth = to_unit(truth_uint8).to(device)
    log.info("editing %d held-out images of %dx%dx%d with ts %s", len(truth), c, h, w, e.ts)
    with atomic_dir(OUT) as tmp:
        # A class-conditional model edits each image under its own (true) class.
        metrics = run_edits(model, truth, truth_labels, sig, e, tmp, lpips)
        atomic_write_json(tmp / "metrics.json", metrics)
    for task in SCORED:
        m = metrics[task]
        if "psnr" in m:
            log.info("%s: PSNR %.2f dB (baseline %.2f), LPIPS %.3f (baseline %.3f)", task, m["psnr"],
                     m["baseline_psnr"], m["lpips"], m["baseline_lpips"])
    log.info("wrote %s", OUT)


if __name__ == "__main__":
    run_stage("edit", main)
