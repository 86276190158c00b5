"""The midtrain stage's setup: Consistency Mid-Training (CMT; Hu et al. 2026, section 3).

The student starts from the teacher's EMA weights under the consistency function's boundary
scalings and regresses every point x_hat_{t_i} of a teacher trajectory onto that trajectory's
clean end x_hat_{t_0} (`cm.losses.midtrain_loss`). A step takes batch_size / nfe trajectories of
nfe points each (the reference's 128 points = 128/16 trajectories x 16 points), from the cache of
whole trajectories (midtrain.pairs = cache: each trajectory is reused) or drawn by the teacher
inside the step (online: fresh noise every step, as the reference does).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from cmpipe.cm.karras import Sigmas
from cmpipe.cm.losses import midtrain_loss
from cmpipe.data import ShardError
from cmpipe.distributed.accel import resident
from cmpipe.errors import ParamsError
from cmpipe.models.teachers import load_teacher
from cmpipe.pipeline.config import resolve_metric
from cmpipe.pipeline.layout import TEACHER, WHOLE_TRAJECTORIES
from cmpipe.pipeline.setups import TrainingSetup, student_of_teacher
from cmpipe.pipeline.trajectory_cache import midtrain_grid, read_cache
from cmpipe.sampling.dpm_solver import dpm_solver_trajectory
from cmpipe.training.loop import EpochSampler
from cmpipe.training.trajectories import load_trajectories
from cmpipe.util.hashing import sha256_file

log = logging.getLogger(__name__)


def points_per_trajectory(m, nfe: int) -> int:
    """k, the points a step takes from each of its trajectories (midtrain.points_per_trajectory; null:
    all nfe, the reference's layout)."""
    k = nfe if m.points_per_trajectory is None else m.points_per_trajectory
    if nfe % k:
        raise ParamsError(f"midtrain.points_per_trajectory = {k} must divide trajectories.nfe = {nfe}, so that "
                          f"every level enters a step equally often; use a divisor of {nfe} or null (all {nfe})")
    return k


def trajectories_per_step(m, nfe: int) -> int:
    """How many trajectories a step of midtrain.batch_size points takes (k points of each)."""
    k = points_per_trajectory(m, nfe)
    if m.batch_size % nfe:
        raise ParamsError(f"midtrain.batch_size = {m.batch_size} must be a multiple of trajectories.nfe = {nfe}: "
                          f"a step takes batch_size / {k} trajectories of {k} points each, every level equally often")
    return m.batch_size // k


def stratified_levels(n: int, k: int, nfe: int, step: int) -> torch.Tensor:
    """n x k indices into a trajectory's nfe points (0 = t_M, the noise): trajectory b of a step
    takes the levels (b + step) mod s + j*s, j < k, with s = nfe / k. Over a step whose n is a
    multiple of s every level enters n*k/nfe times, the same mix as whole trajectories give, but
    from nfe/k times more trajectories (points of one trajectory share their target and are
    correlated; spreading them lowers the gradient's variance). k = nfe is every point."""
    s = nfe // k
    return ((torch.arange(n) + step) % s).unsqueeze(1) + s * torch.arange(k)


def midtrain_setup(m, nfe: int, sig: Sigmas, class_conditional: bool, shape, device, part: slice | None = None,
                   cache_dir: Path = WHOLE_TRAJECTORIES, teacher_path: Path = TEACHER) -> TrainingSetup:
    """CMT from the teacher at `teacher_path` on nfe-step trajectories (params `midtrain`). Under
    torchrun, `part` is this rank's trajectories of the step's global ones."""
    per_step, k = trajectories_per_step(m, nfe), points_per_trajectory(m, nfe)
    grid = midtrain_grid(nfe, sig)
    metric = resolve_metric(m.metric, m.lpips_net, m.lpips_resize, device, m.huber_c)
    if m.pairs == "cache":
        cache = read_whole_cache(cache_dir, nfe, grid, teacher_path)
    student, unet, classes = student_of_teacher(sig, class_conditional, device, m.dropout, m.seed, teacher_path)
    sigmas = grid[:-1].to(device)  # the points that enter: t_M .. t_1; t_0 is the end itself

    def bound(y):
        return student if y is None else student.with_labels(y.to(device).repeat_interleave(k))

    def chosen(step, trajectories):  # the step's k points of each of its trajectories, and their levels
        levels = stratified_levels(per_step, k, nfe, step)
        levels = levels if part is None else levels[part]
        rows = torch.arange(len(levels)).unsqueeze(1)
        return trajectories[rows.to(trajectories.device), levels.to(trajectories.device)], sigmas[levels.to(device)]

    if m.pairs == "cache":
        points, cached_grid, ends, labels = load_trajectories([Path(s["path"]) for s in cache["shards"]], shape)
        if (labels is None) != (classes is None):
            raise ShardError(f"the trajectory cache {cache_dir} and the teacher {teacher_path} disagree on class "
                             f"labels; rebuild the cache with `dvc repro trajectories`")
        points, ends = resident(points[:, :-1].contiguous(), device), resident(ends, device)
        sampler = EpochSampler(len(points), per_step, m.seed)
        log.info("midtrain: %d cached trajectories of %d points; a step takes %d of them, %d points of each",
                 len(points), nfe, per_step, k)

        def loss_at(step, g, target):  # no target: the ends are the regression's targets
            i = sampler.indices(step)
            i = i if part is None else i[part]
            j = i.to(points.device)
            x, t = chosen(step, points[j])
            return midtrain_loss(bound(None if labels is None else labels[i]), x.to(device), t, ends[j].to(device),
                                 metric)

        inputs = [[s["sha256"] for s in cache["shards"]], cache["teacher_sha256"]]
    else:
        teacher = load_teacher(teacher_path, sig.sigma_data, device)
        log.info("midtrain: %d fresh trajectories of %d points a step, by the teacher (online), %d points of each",
                 per_step, nfe, k)

        def loss_at(step, g, target):
            z = torch.randn((per_step, *shape), generator=g)  # drawn for the global step, whatever the world size
            y = torch.randint(classes, (per_step,), generator=g) if classes else None
            if part is not None:
                z, y = z[part], (None if y is None else y[part])
            d = teacher if y is None else teacher.with_labels(y.to(device))
            trajectory = dpm_solver_trajectory(d, z.to(device), grid, sig.sigma_data)
            x, t = chosen(step, trajectory[:, :-1])
            return midtrain_loss(bound(y), x, t, trajectory[:, -1], metric)

        inputs = [sha256_file(teacher_path)]
    return TrainingSetup(student, unet, loss_at, inputs)


def read_whole_cache(cache_dir: Path, nfe: int, grid: torch.Tensor, teacher_path: Path) -> dict:
    """cache.json of the whole-trajectory cache, checked against the params and the teacher
    before anything is loaded."""
    cache = read_cache(cache_dir, "trajectories", "distill.init midtrain")
    if cache.get("nfe") != nfe or not torch.allclose(torch.tensor(cache["grid"]), grid):
        raise ShardError(f"the trajectory cache {cache_dir} holds {cache.get('nfe')}-step trajectories, "
                         f"trajectories.nfe = {nfe}; run `dvc repro trajectories`")
    if cache.get("teacher_sha256") != sha256_file(teacher_path):
        raise ShardError(f"the trajectory cache {cache_dir} was made by another teacher than {teacher_path}; "
                         f"run `dvc repro trajectories`")
    return cache
