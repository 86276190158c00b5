"""DVC stage `distill`: a consistency model by distillation (mode cd) or by training (mode ct).

    python -m stages.distill

Reads params `distill`, `diffusion` and `model`. Mode cd (Song et al. 2023, Algorithm 2) reads
data/teacher/model.pt (the student starts from its EMA weights) and the pairs of
data/trajectories; mode ct (Algorithm 3, or improved CT with the `distill` switches) reads only
the training images of data/shards and starts from random weights: no teacher, no cache.
Outputs data/student/model.pt (weights "model", the target theta^- "target" and the evaluation
EMA "ema" that sampling uses) and reports/distill/ (dvclive curves and samples.png: one-step
samples of the evaluation EMA). A killed run resumes from data/.resume/distill.pt.
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import torch

from cmpipe import distributed, params
from cmpipe.accel import Accel, resident
from cmpipe.consistency_training import CTSchedule, ct_loss, sample_pair_indices
from cmpipe.data import ShardError, load_image_split, read_manifest
from cmpipe.distillation import cd_loss, student_from_teacher
from cmpipe.images import save_grid, to_unit
from cmpipe.karras import Sigmas
from cmpipe.networks import (ConsistencyFunction, build_unet, count_parameters, model_num_classes,
                             num_classes_of, save_model, unet_config)
from cmpipe.sampling import cm_sampler, generate, preview_plan
from cmpipe.stage import run_stage
from cmpipe.teachers import load_teacher_file
from cmpipe.trajectories import load_pairs
from cmpipe.training import EpochSampler, TrainConfig, ema_update, fingerprint_of, train
from cmpipe.layout import DISTILL_REPORT as REPORT, DISTILL_RESUME as RESUME, MANIFEST, STUDENT as OUT, TEACHER, TRAJECTORIES as CACHE

log = logging.getLogger("stages.distill")


def check_switches(d):
    """Combinations of `distill` keys that cannot mean anything, refused before any work."""
    if d.mode == "cd" and d.mu_schedule == "ct":
        raise params.ParamsError("distill.mu_schedule = ct follows the N(k) of consistency training; "
                                 "with distill.mode = cd use mu_schedule: fixed (rate distill.mu)")
    try:
        CTSchedule.from_params(d, 1)
    except ValueError as e:
        raise params.ParamsError(f"params.yaml: {e}") from None


def build_metric(d, device):
    """The distance d: a name for the pixel metrics, the frozen LPIPS network for lpips."""
    if d.metric != "lpips":
        return d.metric
    from cmpipe.lpips import load_lpips

    return load_lpips(d.lpips_net, resize=d.lpips_resize, device=device)


def cd_setup(d, sig: Sigmas, model_params, device, metric, part: slice | None = None):
    """Student from the teacher's EMA, batches of cached teacher pairs: (student, unet, loss, inputs)."""
    if not (CACHE / "cache.json").exists():
        raise ShardError(f"{CACHE / 'cache.json'} not found: run `dvc repro trajectories` first")
    cache = json.loads((CACHE / "cache.json").read_text())
    if cache["num_scales"] != sig.num_scales:
        raise ShardError(f"the trajectory cache was made on a {cache['num_scales']}-point grid but "
                         f"diffusion.num_scales = {sig.num_scales}; run `dvc repro trajectories`")
    net, ckpt = load_teacher_file(TEACHER)
    teacher_classes = num_classes_of(ckpt["unet"])
    if (teacher_classes is not None) != model_params.class_conditional:
        raise params.ParamsError(
            f"model.class_conditional is {str(model_params.class_conditional).lower()} but the teacher "
            f"{TEACHER} is {'class-conditional' if teacher_classes else 'unconditional'}: run "
            f"`dvc repro teacher` (or adopt a teacher that matches)")
    n_all, xn_all, xnext_all, y_all = load_pairs([Path(s["path"]) for s in cache["shards"]], cache["shape"])
    if (y_all is None) != (teacher_classes is None):
        raise ShardError(f"the trajectory cache {CACHE} and the teacher {TEACHER} disagree on class labels; "
                         f"rebuild the cache with `dvc repro trajectories`")
    n_all, xn_all, xnext_all = (resident(t, device) for t in (n_all, xn_all, xnext_all))
    log.info("cd: %d cached pairs, the student starts from the teacher's EMA", len(n_all))
    student = student_from_teacher(net, sig).to(device)
    sampler = EpochSampler(len(n_all), d.batch_size, d.seed)

    def loss_at(step, g, target):
        i = sampler.indices(step)  # the global batch; under torchrun this rank keeps `part`
        i = i if part is None else i[part]
        y = None if y_all is None else y_all[i].to(device)
        j = i.to(xn_all.device)
        return cd_loss(student.with_labels(y), target.with_labels(y), n_all[j].to(device, non_blocking=True),
                       xn_all[j].to(device, non_blocking=True), xnext_all[j].to(device, non_blocking=True),
                       sig, metric, d.huber_c, d.weighting)

    inputs = [[s["sha256"] for s in cache["shards"]], cache["teacher_sha256"]]
    return student, ckpt["unet"], loss_at, inputs


def ct_setup(d, sig: Sigmas, model_params, sched: CTSchedule, device, metric, part: slice | None = None):
    """Student from random weights, batches of training images: (student, unet, loss, inputs)."""
    manifest = read_manifest(MANIFEST)
    c, h, _ = manifest["shape"]
    images, labels = load_image_split(MANIFEST, role="train")
    num_classes = model_num_classes(model_params.class_conditional, manifest["class_names"])
    cfg_unet = unet_config(model_params.block_out_channels, model_params.layers_per_block,
                           model_params.attention_levels, model_params.dropout, h, c, num_classes)
    torch.manual_seed(d.seed)  # the initial weights
    student = ConsistencyFunction(build_unet(cfg_unet), sig.sigma_data, sig.sigma_min).to(device)
    log.info("ct: %d training images, a %.2fM-parameter student from random weights; N(k) %d -> %d, "
             "mu(k) %.4f -> %.4f", len(images), count_parameters(student) / 1e6, sched.N(0),
             sched.N(sched.K), sched.mu_at(0), sched.mu_at(sched.K))
    sampler = EpochSampler(len(images), d.batch_size, d.seed)

    def loss_at(step, g, target):
        sigmas = sig.grid(sched.N(step))
        i = sampler.indices(step)
        x = to_unit(images[i])
        z = torch.randn(x.shape, generator=g)  # drawn for the global batch, whatever the world size
        n = sample_pair_indices(sigmas, len(x), g, d.ct_index, d.ict_P_mean, d.ict_P_std)
        if part is not None:
            i, x, z, n = i[part], x[part], z[part], n[part]
        y = labels[i].to(device) if num_classes else None
        return ct_loss(student.with_labels(y), target.with_labels(y), x.to(device), z.to(device), n, sigmas,
                       metric, d.huber_c, d.weighting)

    inputs = [s["sha256"] for s in manifest["splits"][manifest["roles"]["train"]]["shards"]]
    return student, cfg_unet, loss_at, inputs


def main():
    p = params.load_many("distill", "diffusion", "model", "accel")
    d, sig = p.distill, Sigmas.from_params(p.diffusion)
    check_switches(d)
    dist = distributed.init()
    device = dist.device("auto")
    part = dist.part(d.batch_size) if dist.enabled else None  # checks the split before any work
    accel = Accel.from_params(p.accel, device)
    accel.configure()
    metric = build_metric(d, device)
    cfg = TrainConfig(images=d.images, batch_size=d.batch_size, lr=d.lr, warmup_images=d.warmup_images,
                      grad_clip=d.grad_clip, ema_decays={"ema": d.ema_decay},
                      checkpoint_every=d.checkpoint_every, log_every=d.log_every, seed=d.seed,
                      name="distill", optimizer=d.optimizer)
    sched = CTSchedule.from_params(d, cfg.steps)
    if d.mode == "cd":
        student, unet, loss_at, inputs = cd_setup(d, sig, p.model, device, metric, part)
    else:
        student, unet, loss_at, inputs = ct_setup(d, sig, p.model, sched, device, metric, part)
    if REPORT.exists() and dist.is_main:
        shutil.rmtree(REPORT)

    def loss_fn(step, g, emas):
        # theta^- <- mu(k-1) theta^- + (1 - mu(k-1)) theta after step k-1 (Algorithms 2 and 3);
        # done here rather than as a fixed-rate EMA of the loop because mu may follow a schedule.
        if step > 0:
            ema_update(emas["target"], student, sched.mu_at(step - 1))
        return loss_at(step, g, emas["target"])

    log.info("%s with metric %s, weighting %s, target mu %s", d.mode, d.metric, d.weighting,
             d.mu if d.mu_schedule == "fixed" else "mu(k)")
    target = copy.deepcopy(student).requires_grad_(False)
    fp = fingerprint_of(vars(d), vars(p.diffusion), vars(p.model), inputs)
    emas = train(student, loss_fn, cfg, RESUME, REPORT, fp, device, emas={"target": target}, dist=dist,
                 accel=accel)
    ema_update(emas["target"], student, sched.mu_at(cfg.steps - 1))  # the update after the last step
    if not dist.is_main:  # rank 0 alone writes the model and the grid
        return
    save_model(OUT, "consistency", unet,
               {"ema": emas["ema"].net.state_dict(), "target": emas["target"].net.state_dict(),
                "model": student.net.state_dict()},
               {"sigma_data": sig.sigma_data, "sigma_min": sig.sigma_min, "sigma_max": sig.sigma_max,
                "rho": sig.rho, "num_scales": sig.num_scales, "mode": d.mode,
                "metric": d.metric, "weighting": d.weighting, "images": d.images})
    RESUME.unlink(missing_ok=True)

    ema = emas["ema"].eval()
    shape = (unet["in_channels"], unet["sample_size"], unet["sample_size"])
    count, grid_labels = preview_plan(ema.num_classes)  # one row per class if conditional
    imgs, _ = generate(cm_sampler(ema, sig, [0], d.seed, shape, grid_labels), count, 64, shape, d.seed, device,
                       "one-step grid")
    save_grid(imgs, REPORT / "samples.png", nrow=8)
    log.info("wrote %s and %s", OUT, REPORT / "samples.png")


if __name__ == "__main__":
    run_stage("distill", main)
