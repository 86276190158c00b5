"""DVC stage `distill`: a consistency model by distillation (mode cd), by training (mode ct) or by
Easy Consistency Tuning (mode ect).

    python -m stages.distill

Reads params `distill`, `diffusion`, `model` and `accel`. Mode cd (Song et al. 2023, Algorithm 2)
reads data/teacher/model.pt (the student starts from its EMA weights) and the pairs of
data/trajectories; mode ct (Algorithm 3, or improved CT with the `distill` switches) reads only
the training images of data/shards and starts from random weights: no teacher, no cache; mode
ect (Geng et al. 2025) starts from the teacher's EMA weights and reads the training images: no
cache, no ODE solver, and no target EMA (the student is its own target). With distill.init midtrain
every mode starts from the mid-trained model data/midtrain/model.pt instead (consistency
post-training, CMT); distill.images 0 then trains nothing: the mid-trained model is the student.
Outputs data/student/model.pt (weights "model", the target theta^- "target", in ect the student
itself, and the evaluation EMA "ema" that sampling uses: of several distill.ema_decays, the one
whose held-out one-step samples have the lowest FID, each also kept as "ema_<decay>") and
reports/distill/ (dvclive curves, heldout_fid.csv: the one-step held-out FID of every EMA against
training images, ema_selection.json: the choice, and samples.png: one-step samples of the chosen
EMA). A killed run resumes from data/.resume/distill.pt.
"""
from __future__ import annotations

import logging

from cmpipe.distributed import ddp as distributed
from cmpipe.distributed.accel import Accel
from cmpipe.pipeline import params
from cmpipe.pipeline.config import sigmas_from, train_config_from
from cmpipe.pipeline.layout import DISTILL_REPORT as REPORT, DISTILL_RESUME as RESUME, STUDENT as OUT
from cmpipe.pipeline.setups.distill import check_distill, distill_distance, distill_init, distill_setup
from cmpipe.pipeline.stage import run_stage
from cmpipe.pipeline.training_stage import TrainingStage
from cmpipe.sampling.sets import cm_sampler

log = logging.getLogger("stages.distill")


def main():
    p = params.load_many("distill", "diffusion", "model", "accel")
    d, sig = p.distill, sigmas_from(p.diffusion)
    check_distill(d)
    dist = distributed.init()
    device = dist.device("auto")
    part = dist.part(d.batch_size) if dist.enabled else None  # checks the split before any work
    stage = TrainingStage("distill", d, OUT, REPORT, RESUME, dist)
    stage.check()
    accel = Accel.from_params(p.accel, device, log, announce=dist.is_main)
    accel.configure()
    if d.images == 0:  # no post-training: the mid-trained model is the consistency model
        ema = stage.adopt(distill_init(d), sig.sigma_data, sig.sigma_min, device)
        u = ema.net.config
        shape = (u["in_channels"], u["sample_size"], u["sample_size"])
        return stage.preview(lambda m, labels: cm_sampler(m, sig, [0], d.seed, shape, labels), ema, shape, d.seed,
                             device, "one-step grid")
    setup = distill_setup(d, sig, p.model, train_config_from(d, "distill").steps, device, part)
    shape = (setup.unet["in_channels"], setup.unet["sample_size"], setup.unet["sample_size"])
    metric, weighting = distill_distance(d)
    meta = {"sigma_data": sig.sigma_data, "sigma_min": sig.sigma_min, "sigma_max": sig.sigma_max, "rho": sig.rho,
            "num_scales": sig.num_scales, "mode": d.mode, "pairs": d.pairs if d.mode == "cd" else None,
            "metric": metric, "weighting": weighting, "images": d.images, "init": d.init}
    ema = stage.train(setup, "consistency", meta,
                      lambda m, labels: cm_sampler(m, sig, [0], d.heldout_fid_seed, shape, labels), shape, device,
                      accel, [vars(d), vars(p.diffusion), vars(p.model)])
    if ema is not None:  # rank 0 alone draws the grid
        stage.preview(lambda m, labels: cm_sampler(m, sig, [0], d.seed, shape, labels), ema, shape, d.seed, device,
                      "one-step grid")


if __name__ == "__main__":
    run_stage("distill", main)
