"""DVC stage `teacher`: train the EDM denoiser on the train split (or adopt a saved one).

    python -m stages.teacher

Reads params `model`, `teacher`, `accel` and diffusion.{sigma_data, sigma_min, sigma_max, rho};
inputs data/shards; outputs data/teacher/model.pt and reports/teacher/ (dvclive curves of loss,
learning rate and images/s by optimizer step, heldout_fid.csv: the FID of held-out DPM-Solver++
samples of every EMA against training images, ema_selection.json: which of teacher.ema_decays was
chosen, and samples.png: its samples by Heun). The file's "ema" weights are the chosen EMA; with
several decays each is kept too ("ema_<decay>"). A killed run resumes from data/.resume/teacher.pt.
"""
from __future__ import annotations

import logging

from cmpipe.data import read_manifest
from cmpipe.distributed import ddp as distributed
from cmpipe.distributed.accel import Accel
from cmpipe.models.teachers import adopt_teacher
from cmpipe.pipeline import params
from cmpipe.pipeline.config import sigmas_from
from cmpipe.pipeline.layout import MANIFEST, TEACHER as OUT, TEACHER_REPORT as REPORT, TEACHER_RESUME as RESUME
from cmpipe.pipeline.setups.teacher import teacher_setup
from cmpipe.pipeline.stage import run_stage
from cmpipe.pipeline.training_stage import TrainingStage
from cmpipe.sampling.sets import dpm_sampler, heun_sampler

log = logging.getLogger("stages.teacher")


def main():
    p = params.load_many("model", "teacher", "diffusion", "accel")
    t, sig = p.teacher, sigmas_from(p.diffusion)
    shape = tuple(read_manifest(MANIFEST)["shape"])
    dist = distributed.init()
    device = dist.device("auto")
    if t.checkpoint and dist.enabled:
        raise params.ParamsError("teacher.checkpoint adopts a teacher and trains nothing: run it with "
                                 "dist.nproc_per_node = 1 and dist.nnodes = 1")
    part = dist.part(t.batch_size) if dist.enabled else None  # checks the split before any work
    stage = TrainingStage("teacher", t, OUT, REPORT, RESUME, dist)
    stage.check(trains=not t.checkpoint)
    accel = Accel.from_params(p.accel, device, log, announce=dist.is_main)
    accel.configure()
    if t.checkpoint:
        teacher = adopt_teacher(t.checkpoint, OUT, shape, sig.sigma_data, device)
    else:
        # Each EMA's held-out FID: DPM-Solver++(2M) samples, denoisings clipped as in `sample`.
        teacher = stage.train(teacher_setup(t, p.model, sig, device, part), "edm_teacher",
                              {"sigma_data": sig.sigma_data, "images": t.images, "seed": t.seed},
                              lambda m, labels: dpm_sampler(m, sig, t.heldout_fid_nfe, labels, True), shape,
                              device, accel, [vars(p.model), vars(t), sig.sigma_data])
        if teacher is None:  # rank 0 alone writes the model and the grid
            return
    spi = stage.preview(lambda m, labels: heun_sampler(m, sig, t.grid_steps, labels), teacher, shape, t.seed, device,
                        "teacher grid")
    log.info("teacher grid: Heun, %d NFE, %.3fs/image", 2 * t.grid_steps - 1, spi)


if __name__ == "__main__":
    run_stage("teacher", main)
