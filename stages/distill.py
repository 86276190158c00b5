"""DVC stage `distill`: consistency distillation from the trajectory cache (mode cd).

    python -m stages.distill

Reads params `distill` and `diffusion`; inputs data/teacher/model.pt and data/trajectories;
outputs data/student/model.pt (weights "model", the target "target" = EMA with rate mu,
and the evaluation EMA "ema" that sampling uses) and reports/distill/ (dvclive curves
and samples.png: one-step samples of the evaluation EMA).
A killed run resumes from data/.resume/distill.pt on the next `dvc repro`.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from cmpipe import params
from cmpipe.data import ShardError
from cmpipe.distillation import cd_loss, student_from_teacher
from cmpipe.images import save_grid
from cmpipe.karras import Sigmas
from cmpipe.networks import load_network, save_model
from cmpipe.sampling import cm_sampler, generate
from cmpipe.stage import run_stage
from cmpipe.trajectories import load_pairs
from cmpipe.training import EpochSampler, TrainConfig, fingerprint_of, pick_device, train

TEACHER = Path("data/teacher/model.pt")
CACHE = Path("data/trajectories")
OUT = Path("data/student/model.pt")
REPORT = Path("reports/distill")
RESUME = Path("data/.resume/distill.pt")
log = logging.getLogger("stages.distill")


def main():
    p = params.load_many("distill", "diffusion")
    d, sig = p.distill, Sigmas.from_params(p.diffusion)
    device = pick_device("auto")
    if not (CACHE / "cache.json").exists():
        raise ShardError(f"{CACHE / 'cache.json'} not found: run `dvc repro trajectories` first")
    cache = json.loads((CACHE / "cache.json").read_text())
    if cache["num_scales"] != sig.num_scales:
        raise ShardError(f"the trajectory cache was made on a {cache['num_scales']}-point grid but "
                         f"diffusion.num_scales = {sig.num_scales}; run `dvc repro trajectories`")
    net, ckpt = load_network(TEACHER, ("edm_teacher",))
    if REPORT.exists():
        shutil.rmtree(REPORT)

    n_all, xn_all, xnext_all = load_pairs([Path(s["path"]) for s in cache["shards"]], cache["shape"])
    log.info("read %d cached pairs; distilling with %s on %s", len(n_all), d.metric, device)
    student = student_from_teacher(net, sig).to(device)
    sampler = EpochSampler(len(n_all), d.batch_size, d.seed)

    def loss_fn(step, g, emas):
        i = sampler.indices(step)
        return cd_loss(student, emas["target"], n_all[i].to(device), xn_all[i].to(device),
                       xnext_all[i].to(device), sig, d.metric, d.huber_c)

    cfg = TrainConfig(images=d.images, batch_size=d.batch_size, lr=d.lr, warmup_images=d.warmup_images,
                      grad_clip=d.grad_clip, ema_decays={"target": d.mu, "ema": d.ema_decay},
                      checkpoint_every=d.checkpoint_every, log_every=d.log_every, seed=d.seed,
                      name="distill")
    fp = fingerprint_of(vars(d), vars(p.diffusion), [s["sha256"] for s in cache["shards"]],
                        cache["teacher_sha256"])
    emas = train(student, loss_fn, cfg, RESUME, REPORT, fp, device)
    save_model(OUT, "consistency", ckpt["unet"],
               {"ema": emas["ema"].net.state_dict(), "target": emas["target"].net.state_dict(),
                "model": student.net.state_dict()},
               {"sigma_data": sig.sigma_data, "sigma_min": sig.sigma_min, "mode": d.mode,
                "metric": d.metric, "images": d.images})
    RESUME.unlink(missing_ok=True)

    ema = emas["ema"].eval()
    c, h, w = cache["shape"]
    imgs, _ = generate(cm_sampler(ema, sig, [0], d.seed, (c, h, w)), 64, 64, (c, h, w), d.seed, device,
                       "one-step grid")
    save_grid(imgs, REPORT / "samples.png", nrow=8)
    log.info("wrote %s and %s", OUT, REPORT / "samples.png")


if __name__ == "__main__":
    run_stage("distill", main)
