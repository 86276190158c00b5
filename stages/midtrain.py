"""DVC stage `midtrain`: Consistency Mid-Training (CMT; Hu et al. 2026) between the teacher and distill.

    python -m stages.midtrain

Reads params `midtrain`, trajectories.nfe, `diffusion`, `model`, `accel` and distill.init; inputs
data/teacher/model.pt and data/whole_trajectories (the cache of whole teacher trajectories, with
midtrain.pairs cache). The student starts from the teacher's EMA under the consistency function's
boundary scalings and regresses every point of a teacher trajectory onto its clean end
(pipeline.setups.midtrain); midtrain.images counts trajectory points. Outputs
data/midtrain/model.pt (a consistency model: "ema" the chosen evaluation EMA, "model", and each
"ema_<decay>") and reports/midtrain/ (dvclive curves by optimizer step, heldout_fid.csv: one-step
held-out FID of every EMA, ema_selection.json, samples.png: one-step samples). With distill.init
teacher nobody reads it: the stage writes data/midtrain/unused.json saying so, in seconds.
A killed run resumes from data/.resume/midtrain.pt.
"""
from __future__ import annotations

import logging

from cmpipe.data import read_manifest
from cmpipe.distributed import ddp as distributed
from cmpipe.distributed.accel import Accel
from cmpipe.pipeline import params
from cmpipe.pipeline.config import sigmas_from
from cmpipe.pipeline.layout import MANIFEST, MIDTRAIN as OUT, MIDTRAIN_REPORT as REPORT, MIDTRAIN_RESUME as RESUME
from cmpipe.pipeline.setups.midtrain import midtrain_setup, trajectories_per_step
from cmpipe.pipeline.stage import run_stage
from cmpipe.pipeline.training_stage import TrainingStage
from cmpipe.sampling.sets import cm_sampler

log = logging.getLogger("stages.midtrain")


def main():
    p = params.load_many("midtrain", "trajectories", "diffusion", "model", "accel", "distill")
    m, nfe, sig = p.midtrain, p.trajectories.nfe, sigmas_from(p.diffusion)
    shape = tuple(read_manifest(MANIFEST)["shape"])
    dist = distributed.init()
    stage = TrainingStage("midtrain", m, OUT, REPORT, RESUME, dist)
    if p.distill.init != "midtrain":
        stage.write_unused(f"distill.init is {p.distill.init}")
        return
    device = dist.device("auto")
    part = dist.part(trajectories_per_step(m, nfe)) if dist.enabled else None  # checks the split first
    stage.check()
    accel = Accel.from_params(p.accel, device, log, announce=dist.is_main)
    accel.configure()
    setup = midtrain_setup(m, nfe, sig, p.model.class_conditional, shape, device, part)
    meta = {"sigma_data": sig.sigma_data, "sigma_min": sig.sigma_min, "sigma_max": sig.sigma_max, "rho": sig.rho,
            "num_scales": sig.num_scales, "mode": "midtrain", "pairs": m.pairs, "nfe": nfe, "metric": m.metric,
            "weighting": "uniform", "images": m.images}
    ema = stage.train(setup, "consistency", meta,
                      lambda f, labels: cm_sampler(f, sig, [0], m.heldout_fid_seed, shape, labels), shape, device,
                      accel, [vars(m), nfe, vars(p.diffusion), vars(p.model)])
    if ema is not None:  # rank 0 alone draws the grid
        stage.preview(lambda f, labels: cm_sampler(f, sig, [0], m.seed, shape, labels), ema, shape, m.seed, device,
                      "one-step grid")


if __name__ == "__main__":
    run_stage("midtrain", main)
