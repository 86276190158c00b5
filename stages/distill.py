"""DVC stage `distill`: a consistency model by distillation (mode cd), by training (mode ct) or by
Easy Consistency Tuning (mode ect).

    python -m stages.distill

Reads params `distill`, `diffusion` and `model`. Mode cd (Song et al. 2023, Algorithm 2) reads
data/teacher/model.pt (the student starts from its EMA weights) and the pairs of
data/trajectories; mode ct (Algorithm 3, or improved CT with the `distill` switches) reads only
the training images of data/shards and starts from random weights: no teacher, no cache; mode
ect (Geng et al. 2025) starts from the teacher's EMA weights and reads the training images: no
cache, no ODE solver, and no target EMA (the student is its own target).
Outputs data/student/model.pt (weights "model", the target theta^- "target", in ect the student
itself, and the evaluation EMA "ema" that sampling uses: of several distill.ema_decays, the one
whose held-out one-step samples have the lowest FID, each also kept as "ema_<decay>") and
reports/distill/ (dvclive curves, heldout_fid.csv: the one-step held-out FID of every EMA against
training images, ema_selection.json: the choice, and samples.png: one-step samples of the chosen
EMA). A killed run resumes from data/.resume/distill.pt.
"""
from __future__ import annotations

import copy
import logging
import shutil

from cmpipe.distributed import ddp as distributed
from cmpipe.distributed.accel import Accel
from cmpipe.util.images import save_grid
from cmpipe.models.networks import save_model
from cmpipe.pipeline import params
from cmpipe.pipeline.config import (
    ct_schedule_from,
    resolve_metric,
    sigmas_from,
    train_config_from,
)
from cmpipe.pipeline.ema import HeldoutFID, check_heldout_fid, evaluation_ema, scores_heldout_fid
from cmpipe.pipeline.layout import DISTILL_REPORT as REPORT, DISTILL_RESUME as RESUME, STUDENT as OUT
from cmpipe.pipeline.setups import cd_setup, ct_setup, ect_setup
from cmpipe.pipeline.stage import run_stage
from cmpipe.sampling.sets import class_labels, cm_sampler, generate, preview_plan
from cmpipe.training.loop import ema_update, train
from cmpipe.util.hashing import fingerprint_of

log = logging.getLogger("stages.distill")


def check_switches(d):
    """Combinations of `distill` keys that cannot mean anything, refused before any work."""
    if d.mode == "cd" and d.mu_schedule in ("ct", "ct_paper"):
        raise params.ParamsError(f"distill.mu_schedule = {d.mu_schedule} follows the N(k) of consistency training; "
                                 "with distill.mode = cd use mu_schedule: fixed (rate distill.mu)")
    try:
        ct_schedule_from(d, 1)
    except ValueError as e:
        raise params.ParamsError(f"params.yaml: {e}") from None
    check_heldout_fid(d, "distill")


def main():
    p = params.load_many("distill", "diffusion", "model", "accel")
    d, sig = p.distill, sigmas_from(p.diffusion)
    check_switches(d)
    dist = distributed.init()
    device = dist.device("auto")
    part = dist.part(d.batch_size) if dist.enabled else None  # checks the split before any work
    accel = Accel.from_params(p.accel, device)
    accel.configure()
    ect = d.mode == "ect"  # its loss has its own distance and weighting, and no target EMA
    metric = None if ect else resolve_metric(d.metric, d.lpips_net, d.lpips_resize, device, d.huber_c)
    cfg = train_config_from(d, "distill")
    sched = ct_schedule_from(d, cfg.steps)
    if d.mode == "cd":
        student, unet, loss_at, inputs = cd_setup(d, sig, p.model.class_conditional, device, metric, part)
    elif ect:
        student, unet, loss_at, inputs = ect_setup(d, sig, p.model.class_conditional, cfg.steps, device, part)
    else:
        student, unet, loss_at, inputs = ct_setup(d, sig, p.model, sched, device, metric, part)
    if REPORT.exists() and dist.is_main:
        shutil.rmtree(REPORT)

    def loss_fn(step, g, emas):
        if ect:  # theta^- = stopgrad(theta): the student itself, inside ect_loss
            return loss_at(step, g, None)
        # theta^- <- mu(k-1) theta^- + (1 - mu(k-1)) theta after step k-1 (Algorithms 2 and 3);
        # done here rather than as a fixed-rate EMA of the loop because mu may follow a schedule.
        if step > 0:
            ema_update(emas["target"], student, sched.mu_at(step - 1))
        return loss_at(step, g, emas["target"])

    if ect:
        metric_name, weighting = f"pseudo_huber(c={d.ect_huber_c:g})", "1/(t-r)"
        log.info("ect with distance %s, weighting %s, the student as its own target", metric_name, weighting)
    else:
        metric_name, weighting = d.metric, d.weighting
        log.info("%s with metric %s, weighting %s, target mu %s", d.mode, d.metric, d.weighting,
                 d.mu if d.mu_schedule == "fixed" else "mu(k)")
    # The target runs in training mode like the student (openai's target_model.train()), so that with
    # dropout it sees the student's mask (cm.losses.consistency_loss).
    targets = {} if ect else {"target": copy.deepcopy(student).requires_grad_(False).train()}
    fp = fingerprint_of(vars(d), vars(p.diffusion), vars(p.model), inputs)
    shape = (unet["in_channels"], unet["sample_size"], unet["sample_size"])
    heldout_labels = class_labels(student.num_classes, d.heldout_fid_seed)
    scorer = HeldoutFID(d, lambda m: cm_sampler(m, sig, [0], d.heldout_fid_seed, shape, heldout_labels), shape,
                        device) if scores_heldout_fid(d) else None
    history = []
    emas = train(student, loss_fn, cfg, RESUME, REPORT, fp, device, emas=targets, dist=dist, accel=accel,
                 evaluate=scorer, history_out=history)
    if not ect:
        ema_update(emas["target"], student, sched.mu_at(cfg.steps - 1))  # the update after the last step
    if not dist.is_main:  # rank 0 alone chooses the EMA and writes the model and the grid
        return
    best, choice = evaluation_ema(d, history, REPORT)
    others = {n: m.net.state_dict() for n, m in emas.items() if n not in ("ema", "target")}
    save_model(OUT, "consistency", unet,
               {"ema": emas[best].net.state_dict(), "target": (student if ect else emas["target"]).net.state_dict(),
                "model": student.net.state_dict(), **others},
               {"sigma_data": sig.sigma_data, "sigma_min": sig.sigma_min, "sigma_max": sig.sigma_max,
                "rho": sig.rho, "num_scales": sig.num_scales, "mode": d.mode,
                "pairs": d.pairs if d.mode == "cd" else None,
                "metric": metric_name, "weighting": weighting, "images": d.images,
                "ema_decay": choice["chosen_decay"]})
    RESUME.unlink(missing_ok=True)

    ema = emas[best].eval()
    count, grid_labels = preview_plan(ema.num_classes)  # one row per class if conditional
    imgs, _ = generate(cm_sampler(ema, sig, [0], d.seed, shape, grid_labels), count, 64, shape, d.seed, device,
                       "one-step grid")
    save_grid(imgs, REPORT / "samples.png", nrow=8)
    log.info("wrote %s and %s", OUT, REPORT / "samples.png")


if __name__ == "__main__":
    run_stage("distill", main)
