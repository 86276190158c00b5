"""DVC stage `teacher`: train the EDM denoiser on the train split (or adopt a saved one).

    python -m stages.teacher

Reads params `model`, `teacher` and diffusion.{sigma_data, sigma_min, sigma_max, rho};
inputs data/shards; outputs data/teacher/model.pt and reports/teacher/ (dvclive
curves of loss, learning rate and images/s, heldout_fid.csv: the FID of held-out DPM-Solver++ samples
of every EMA against training images, ema_selection.json: which of teacher.ema_decays was chosen, and samples.png: its samples by Heun).
The file's "ema" weights are the chosen EMA; with several decays each is kept too ("ema_<decay>").
A killed run resumes from data/.resume/teacher.pt on the next `dvc repro`.
"""
from __future__ import annotations

import logging
import shutil

import torch

from cmpipe.cm.losses import edm_loss
from cmpipe.cm.precond import EDMDenoiser
from cmpipe.data import load_image_split, read_manifest
from cmpipe.distributed import ddp as distributed
from cmpipe.distributed.accel import Accel, resident
from cmpipe.export.diffusers import is_diffusers_dir
from cmpipe.util.images import save_grid, to_unit
from cmpipe.models.networks import (
    build_unet,
    count_parameters,
    load_network,
    model_num_classes,
    save_model,
    unet_config,
)
from cmpipe.pipeline import params
from cmpipe.pipeline.config import sigmas_from, train_config_from
from cmpipe.pipeline.ema import HeldoutFID, check_heldout_fid, evaluation_ema, scores_heldout_fid
from cmpipe.pipeline.layout import MANIFEST, TEACHER as OUT, TEACHER_REPORT as REPORT, TEACHER_RESUME as RESUME
from cmpipe.pipeline.stage import run_stage
from cmpipe.sampling.sets import class_labels, dpm_sampler, generate, heun_sampler, preview_plan
from cmpipe.models.teachers import adopt_diffusers_teacher, load_teacher
from cmpipe.training.loop import EpochSampler, train
from cmpipe.util.hashing import fingerprint_of

log = logging.getLogger("stages.teacher")


def main():
    p = params.load_many("model", "teacher", "diffusion", "accel")
    t, sig = p.teacher, sigmas_from(p.diffusion)
    manifest = read_manifest(MANIFEST)
    c, h, w = manifest["shape"]
    dist = distributed.init()
    device = dist.device("auto")
    if t.checkpoint and dist.enabled:
        raise params.ParamsError("teacher.checkpoint adopts a teacher and trains nothing: run it with "
                                 "dist.nproc_per_node = 1 and dist.nnodes = 1")
    part = dist.part(t.batch_size) if dist.enabled else None  # checks the split before any work
    accel = Accel.from_params(p.accel, device)
    accel.configure()
    if not t.checkpoint:
        check_heldout_fid(t, "teacher")
    if REPORT.exists() and dist.is_main:
        shutil.rmtree(REPORT)

    if t.checkpoint and is_diffusers_dir(t.checkpoint):
        # A diffusers ε-prediction UNet2DModel + DDPMScheduler: saved as a "ddpm_teacher" file.
        adopt_diffusers_teacher(t.checkpoint, OUT, (c, h, w))
        ema = load_teacher(OUT, sig.sigma_data, device)
        log.info("adopted the diffusers ε-teacher %s (%d DDPM levels, sigma %.4g..%.4g) as %s; no training",
                 t.checkpoint, ema.num_train_timesteps, ema.sigma_min, ema.sigma_max, OUT)
    elif t.checkpoint:
        # Adopt a teacher saved by this pipeline: check it fits the data, train nothing.
        net, ckpt = load_network(t.checkpoint, ("edm_teacher",))
        if [ckpt["unet"]["in_channels"], ckpt["unet"]["sample_size"]] != [c, h]:
            raise params.ParamsError(
                f"teacher.checkpoint {t.checkpoint} is for {ckpt['unet']['in_channels']}x"
                f"{ckpt['unet']['sample_size']}^2 images, the shards hold {c}x{h}x{w}")
        log.info("adopting the teacher %s; no training", t.checkpoint)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        save_model(OUT, "edm_teacher", ckpt["unet"], ckpt["weights"], dict(ckpt["meta"], adopted_from=t.checkpoint))
        ema = EDMDenoiser(net, sig.sigma_data)
    else:
        num_classes = model_num_classes(p.model.class_conditional, manifest["class_names"])
        cfg_unet = unet_config(p.model.block_out_channels, p.model.layers_per_block,
                               p.model.attention_levels, p.model.dropout, h, c, num_classes)
        torch.manual_seed(t.seed)  # the initial weights
        net = build_unet(cfg_unet).to(device)
        log.info("UNet2DModel with %.2fM parameters on %s%s", count_parameters(net) / 1e6, device,
                 f", conditioned on {num_classes} classes" if num_classes else "")
        images, labels = load_image_split(MANIFEST, role="train")
        images, labels = resident(images, device), resident(labels, device)
        sampler = EpochSampler(len(images), t.batch_size, t.seed)
        model = EDMDenoiser(net, sig.sigma_data)

        def loss_fn(step, g, emas):
            i = sampler.indices(step)  # the global batch; under torchrun this rank keeps `part`
            x = to_unit(images[i.to(images.device)]).to(device, non_blocking=True)
            y = labels[(i if part is None else i[part]).to(labels.device)].to(device) if num_classes else None
            return edm_loss(model.with_labels(y), x, t.P_mean, t.P_std, sig.sigma_data, generator=g, part=part)

        cfg = train_config_from(t, "teacher")
        fp = fingerprint_of(vars(p.model), vars(t), sig.sigma_data,
                            [s["sha256"] for s in manifest["splits"][manifest["roles"]["train"]]["shards"]])
        # Each EMA's held-out FID: DPM-Solver++(2M) samples, denoisings clipped as in `sample`.
        heldout_labels = class_labels(num_classes, t.heldout_fid_seed)
        scorer = HeldoutFID(t, lambda m: dpm_sampler(m, sig, t.heldout_fid_nfe, heldout_labels, True), (c, h, w),
                            device) if scores_heldout_fid(t) else None
        history = []
        emas = train(model, loss_fn, cfg, RESUME, REPORT, fp, device, dist=dist, accel=accel, evaluate=scorer,
                     history_out=history)
        if not dist.is_main:  # rank 0 alone writes the model and the grid
            return
        best, choice = evaluation_ema(t, history, REPORT)
        ema = emas[best]
        others = {n: m.net.state_dict() for n, m in emas.items() if n != "ema"}
        save_model(OUT, "edm_teacher", cfg_unet, {"ema": ema.net.state_dict(), "model": net.state_dict(), **others},
                   {"sigma_data": sig.sigma_data, "images": t.images, "seed": t.seed,
                    "ema_decay": choice["chosen_decay"]})
        RESUME.unlink(missing_ok=True)

    # EMA samples with Heun on the Karras grid: a fixed seed, so grids compare across runs.
    ema.eval()
    count, grid_labels = preview_plan(getattr(ema, "num_classes", None))  # one row per class if conditional
    imgs, spi = generate(heun_sampler(ema, sig, t.grid_steps, grid_labels), count, 64, (c, h, w), t.seed,
                         device, "teacher grid")
    REPORT.mkdir(parents=True, exist_ok=True)
    save_grid(imgs, REPORT / "samples.png", nrow=8)
    log.info("wrote %s and %s (Heun, %d NFE: %.3fs/image)", OUT, REPORT / "samples.png",
             2 * t.grid_steps - 1, spi)


if __name__ == "__main__":
    run_stage("teacher", main)
