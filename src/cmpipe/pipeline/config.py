"""params.yaml sections turned into the library's objects (the only code besides the stages that
knows the keys of params.yaml)."""
from __future__ import annotations

from cmpipe.cm.karras import Sigmas
from cmpipe.cm.losses import Distance, pixel_distance
from cmpipe.cm.schedules import CTSchedule
from cmpipe.training.ema import ema_names
from cmpipe.training.loop import TrainConfig


def sigmas_from(diffusion) -> Sigmas:
    """The noise levels of the `diffusion` section."""
    return Sigmas(diffusion.sigma_min, diffusion.sigma_max, diffusion.sigma_data, diffusion.rho,
                  diffusion.num_scales)


def ct_schedule_from(d, K: int) -> CTSchedule:
    """N(k) and mu(k) of the `distill` section over K training steps."""
    return CTSchedule(K, d.ct_num_scales, d.ct_s0, d.ct_s1, d.ct_mu0, d.ict_s0, d.ict_s1, d.mu_schedule, d.mu)


def train_config_from(section, name: str, **overrides) -> TrainConfig:
    """The loop of a section with the training keys (`teacher`, `distill`): its images, batch_size,
    lr, optimizer, warmup_images, lr_schedule, grad_clip, seed, checkpoint_every, log_every, heldout_fid_every, and its ema_decays
    as the evaluation EMAs ("ema" for one decay, "ema_<decay>" for several: `ema_names`)."""
    keys = dict(images=section.images, batch_size=section.batch_size, lr=section.lr,
                warmup_images=section.warmup_images, grad_clip=section.grad_clip,
                ema_decays=ema_names(section.ema_decays), checkpoint_every=section.checkpoint_every,
                log_every=section.log_every, seed=section.seed, name=name, optimizer=section.optimizer,
                eval_every=section.heldout_fid_every, lr_schedule=section.lr_schedule)
    return TrainConfig(**{**keys, **overrides})


def resolve_metric(name: str, lpips_net: str = "alex", lpips_resize: int | None = 224, device="cpu",
                   huber_c: float | None = None) -> Distance:
    """The distance d of `distill.metric`: l2, l1, pseudo-Huber (with `distill.huber_c`), or the
    frozen LPIPS network (offline weights) for 'lpips'."""
    if name != "lpips":
        return pixel_distance(name, huber_c)
    from cmpipe.metrics.lpips import load_lpips

    return load_lpips(lpips_net, resize=lpips_resize, device=device)
