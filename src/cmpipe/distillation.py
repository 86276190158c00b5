"""Consistency distillation (Song et al. 2023, Algorithm 2) from cached or online teacher pairs."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .accel import resident
from .data import ShardError
from .karras import Sigmas
from .layout import TEACHER, TRAJECTORIES
from .losses import consistency_loss, teacher_heun_pair
from .networks import ConsistencyFunction, num_classes_of
from .params import ParamsError
from .schedules import ict_weight
from .teachers import load_teacher_file
from .training import EpochSampler
from .trajectories import load_pairs

log = logging.getLogger(__name__)


class ConsistencySetup(NamedTuple):
    """What the training loop of a consistency model needs from its mode (cd or ct)."""
    student: ConsistencyFunction
    unet: dict  # the student's UNet2DModel config, saved beside its weights
    loss_at: Callable  # (step, generator, target) -> the loss of the step's batch
    inputs: list  # hashes of the data the loss reads: part of the resume fingerprint


def student_from_teacher(teacher_net: torch.nn.Module, sig: Sigmas) -> ConsistencyFunction:
    """The student starts from the teacher's weights, with the boundary-condition scalings."""
    return ConsistencyFunction(copy.deepcopy(teacher_net).requires_grad_(True), sig.sigma_data, sig.sigma_min)


def cd_loss(student, target, n: torch.Tensor, x_n: torch.Tensor, x_next: torch.Tensor, sig: Sigmas,
            metric, huber_c: float | None = None, weighting: str = "uniform") -> torch.Tensor:
    """lambda(sigma_n) d(f_theta(x_n, sigma_n), f_theta^-(x_hat_{n+1}, sigma_{n+1})).

    weighting 'uniform' is the paper's CD (lambda = 1); 'ict' is 1 / |sigma_n - sigma_{n+1}|.
    """
    grid = sig.grid().float().to(x_n.device)
    s_n, s_next = grid[n], grid[n + 1]
    weight = ict_weight(s_n, s_next) if weighting == "ict" else None
    return consistency_loss(student, target, x_n, s_n, x_next, s_next, metric, huber_c, weight)


def cd_loss_online(student, target, teacher, x: torch.Tensor, n: torch.Tensor, z: torch.Tensor,
                   sig: Sigmas, metric, huber_c: float | None = None, weighting: str = "uniform") -> torch.Tensor:
    """The same loss with the teacher's Heun step computed in the step (no cache)."""
    grid = sig.grid().float().to(x.device)
    x_n, x_next = teacher_heun_pair(teacher, x, z, grid[n], grid[n + 1])
    return cd_loss(student, target, n, x_n, x_next, sig, metric, huber_c, weighting)


def cd_setup(d, sig: Sigmas, class_conditional: bool, device, metric, part: slice | None = None,
             cache_dir: Path = TRAJECTORIES, teacher_path: Path = TEACHER) -> ConsistencySetup:
    """CD from the trajectory cache: the student starts from the teacher's EMA and each step
    reads a batch of cached Heun pairs (params `distill`: batch_size, seed, huber_c, weighting).

    Under torchrun, `part` is this rank's rows of the global batch.
    """
    cache_file = Path(cache_dir) / "cache.json"
    if not cache_file.exists():
        raise ShardError(f"{cache_file} not found: run `dvc repro trajectories` first")
    cache = json.loads(cache_file.read_text())
    if cache["num_scales"] != sig.num_scales:
        raise ShardError(f"the trajectory cache was made on a {cache['num_scales']}-point grid but "
                         f"diffusion.num_scales = {sig.num_scales}; run `dvc repro trajectories`")
    net, ckpt = load_teacher_file(teacher_path)
    teacher_classes = num_classes_of(ckpt["unet"])
    if (teacher_classes is not None) != class_conditional:
        raise ParamsError(
            f"model.class_conditional is {str(class_conditional).lower()} but the teacher "
            f"{teacher_path} is {'class-conditional' if teacher_classes else 'unconditional'}: run "
            f"`dvc repro teacher` (or adopt a teacher that matches)")
    n_all, xn_all, xnext_all, y_all = load_pairs([Path(s["path"]) for s in cache["shards"]], cache["shape"])
    if (y_all is None) != (teacher_classes is None):
        raise ShardError(f"the trajectory cache {cache_dir} and the teacher {teacher_path} disagree on class "
                         f"labels; rebuild the cache with `dvc repro trajectories`")
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
    return ConsistencySetup(student, ckpt["unet"], loss_at, inputs)
