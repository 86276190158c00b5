"""The teacher-trajectory cache of consistency distillation.

Pair i holds a grid index n, x_n = x + sigma_n z and the teacher's Heun step
x_hat_{n+1} from sigma_n to sigma_{n+1} (Song et al. 2023, Algorithm 2). Its
image, n and z come from a generator seeded with (seed, i), so the cache does
not depend on the batch size or the number of processes that computed it.
Distillation then reads pairs instead of running the teacher (about 1.5x faster
per step, docs/design.md §4), and experiments on distillation settings reuse it.

Consistency Mid-Training (CMT) reads whole trajectories instead: trajectory i is the teacher's
DPM-Solver++(2M) run from sigma_max z on a given grid, every point kept, with z (and the class
of a class-conditional teacher) from the generator seeded with (seed, i), in the same batches.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from cmpipe.cm.karras import Sigmas
from cmpipe.cm.losses import teacher_heun_pair
from cmpipe.data import ShardError, read_records
from cmpipe.distributed.ddp import SINGLE, Dist, gather_in_order
from cmpipe.util.images import to_unit
from cmpipe.util.hashing import check_sha256
from cmpipe.util.seeding import seeded_generator


def pair_randomness(seed: int, i: int, num_images: int, num_scales: int, shape):
    """(image index, grid index n in 0..N-2, z) of pair i."""
    g = seeded_generator(seed, i)
    image = int(torch.randint(num_images, (1,), generator=g))
    n = int(torch.randint(num_scales - 1, (1,), generator=g))
    z = torch.randn(shape, generator=g)
    return image, n, z


def compute_pairs(teacher, images_uint8: torch.Tensor, num_pairs: int, seed: int, sig: Sigmas,
                  batch_size: int, device: torch.device, bf16: bool = False,
                  indices: range | None = None, labels: torch.Tensor | None = None,
                  dist: Dist = SINGLE, *, parts_dir: Path) -> Iterator[dict]:
    """Yield records {"__key__", "cls": n, "json": {"image"}, "xn.npy", "xnext.npy"} in pair order.

    With `labels` (the class of each training image) the teacher is class-conditional: it is
    given the image's class, and the class is stored in the record's json as "label".
    Under torchrun (`dist`), batch b is computed by rank b mod W (the same batches as one
    process) and rank 0 yields them all in order; the other ranks yield nothing. `parts_dir` is
    the stage's output folder (the ranks' parts are left beside it); required, no default.
    """
    yield from batched_records(
        lambda idx: pair_batch(teacher, images_uint8, idx, seed, sig, device, bf16, labels),
        indices if indices is not None else range(num_pairs), batch_size, dist, parts_dir)


def batched_records(compute_batch, indices, batch_size: int, dist: Dist, parts_dir: Path,
                    desc: str = "trajectories") -> Iterator[dict]:
    """Yield the records compute_batch(idx) of consecutive batches of `indices`, in order: under
    torchrun batch b is computed by rank b mod W (its parts written to `parts_dir`) and rank 0
    yields them all; the other ranks yield nothing."""
    if parts_dir is None:
        raise ValueError("parts_dir (the folder for the ranks' parts, the stage's output) is required")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batches = [indices[s:s + batch_size] for s in range(0, len(indices), batch_size)]
    bar = tqdm(total=len(dist.my_batches(len(batches))), desc=desc, unit="batch", mininterval=2.0)

    def compute(b):
        recs = compute_batch(batches[b])
        bar.update()
        return recs

    for recs in gather_in_order(dist, len(batches), compute, Path(parts_dir), desc):
        yield from recs
    bar.close()


def teacher_autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked, else nothing."""
    return (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda"
            else contextlib.nullcontext())


@torch.inference_mode()
def pair_batch(teacher, images_uint8: torch.Tensor, idx, seed: int, sig: Sigmas, device: torch.device,
               bf16: bool = False, labels: torch.Tensor | None = None) -> list[dict]:
    """The records of the pairs `idx` (one batch of the teacher)."""
    grid = sig.grid().float()
    shape = tuple(images_uint8.shape[1:])
    autocast = teacher_autocast(device, bf16)
    out = []
    rnd = [pair_randomness(seed, i, len(images_uint8), sig.num_scales, shape) for i in idx]
    img = torch.tensor([r[0] for r in rnd])
    n = torch.tensor([r[1] for r in rnd])
    z = torch.stack([r[2] for r in rnd])
    x = to_unit(images_uint8[img]).to(device)
    y = None if labels is None else labels[img]
    D = teacher if y is None else teacher.with_labels(y.to(device))
    with autocast:
        x_n, x_next = teacher_heun_pair(D, x, z.to(device), grid[n].to(device), grid[n + 1].to(device))
    x_n, x_next = x_n.float().cpu().numpy(), x_next.float().cpu().numpy()
    for j, i in enumerate(idx):
        info = {"image": int(img[j])} if y is None else {"image": int(img[j]), "label": int(y[j])}
        out.append({"__key__": f"pair_{i:09d}", "cls": int(n[j]), "json": info,
                    "xn.npy": x_n[j], "xnext.npy": x_next[j]})
    return out


def trajectory_randomness(seed: int, i: int, shape, num_classes: int | None = None):
    """(z, class or None) of trajectory i, from the generator seeded with (seed, i): z first, so a
    conditional and an unconditional cache of one seed start from the same noises."""
    g = seeded_generator(seed, i)
    z = torch.randn(tuple(shape), generator=g)
    label = None if num_classes is None else int(torch.randint(num_classes, (1,), generator=g))
    return z, label


def compute_trajectories(teacher, num_trajectories: int, seed: int, sigmas, shape, batch_size: int,
                         device: torch.device, *, parts_dir: Path, sigma_data: float = 0.5,
                         bf16: bool = False, indices: range | None = None,
                         dist: Dist = SINGLE) -> Iterator[dict]:
    """Yield records {"__key__": traj_<i>, "json": {"index"[, "label"]}, "points.npy": P x C x H x W,
    "sigmas.npy": P} of the teacher's DPM-Solver++(2M) trajectories on the grid `sigmas` (CMT;
    P = len(sigmas), the last point the clean end x_hat_{t_0}), in trajectory order.

    A class-conditional teacher (its `num_classes`) is given trajectory i's class, drawn
    uniformly with its noise. Batches and ranks as compute_pairs; `parts_dir` is the stage's output.
    """
    from cmpipe.sampling.dpm_solver import check_sigma_grid

    grid = check_sigma_grid(sigmas)
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be the image shape C x H x W, got {shape}")
    if indices is None:
        if not isinstance(num_trajectories, int) or num_trajectories < 1:
            raise ValueError(f"num_trajectories must be a positive integer, got {num_trajectories!r}")
        indices = range(num_trajectories)
    yield from batched_records(
        lambda idx: trajectory_batch(teacher, idx, seed, grid, shape, device, sigma_data, bf16),
        indices, batch_size, dist, parts_dir, desc="midtrain-trajectories")


@torch.inference_mode()
def trajectory_batch(teacher, idx, seed: int, sigmas: torch.Tensor, shape, device: torch.device,
                     sigma_data: float = 0.5, bf16: bool = False) -> list[dict]:
    """The records of the trajectories `idx` (one batch of the teacher)."""
    from cmpipe.sampling.dpm_solver import dpm_solver_trajectory

    num_classes = getattr(teacher, "num_classes", None)
    rnd = [trajectory_randomness(seed, i, shape, num_classes) for i in idx]
    z = torch.stack([r[0] for r in rnd]).to(device)
    D = teacher if num_classes is None else teacher.with_labels(torch.tensor([r[1] for r in rnd]).to(device))
    with teacher_autocast(device, bf16):
        points = dpm_solver_trajectory(D, z, sigmas, sigma_data)
    points = points.float().cpu().numpy()
    grid = sigmas.float().cpu().numpy()
    out = []
    for j, i in enumerate(idx):
        info = {"index": int(i)} if num_classes is None else {"index": int(i), "label": rnd[j][1]}
        out.append({"__key__": f"traj_{i:09d}", "json": info, "points.npy": points[j], "sigmas.npy": grid})
    return out


CACHE_FIX = "re-create the cache with `dvc repro -f trajectories` (or restore it with `dvc checkout data/trajectories`)"


def verify_cache(shards: list[Path], record: Path | None = None, fix: str = CACHE_FIX) -> None:
    """Check each shard against the sha256 the cache's `cache.json` records for it (found beside
    the shards' folder unless given); shards it does not list are refused (`fix`: what to do)."""
    shards = [Path(s) for s in shards]
    if record is None:
        record = shards[0].parent.parent / "cache.json" if shards else None
    if record is None or not record.is_file():
        return  # a bare list of shards (tests, benchmarks): no record to check against
    try:
        listed = {str(Path(e["path"])): e["sha256"] for e in json.loads(record.read_text())["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardError(f"{record}: unreadable cache record ({type(e).__name__}: {e}); {fix}") from None
    for s in shards:
        expected = listed.get(str(s))
        if expected is None:
            raise ShardError(f"{s} is not one of the shards {record} lists; {fix}")
        check_sha256(s, expected, record, fix, error=ShardError)


def load_pairs(shards: list[Path], shape, verify: bool = True):
    """Read a cache into memory: (n int64 [P], x_n float32 [P,C,H,W], x_next float32 [P,C,H,W],
    labels int64 [P] of a class-conditional teacher's cache, else None).

    With `verify`, every shard is first checked against the sha256 its cache.json records."""
    if verify:
        verify_cache(shards)
    ns, xn, xnext, labels = [], [], [], []
    for rec in read_records(shards):
        for k in ("cls", "xn.npy", "xnext.npy"):
            if k not in rec:
                raise ShardError(f"shard {rec['__url__']} pair {rec['__key__']} has no {k} member; "
                                 f"rebuild the cache with `dvc repro trajectories`")
        if rec["xn.npy"].shape != tuple(shape) or rec["xnext.npy"].shape != tuple(shape):
            raise ShardError(f"shard {rec['__url__']} pair {rec['__key__']} has shape "
                             f"{rec['xn.npy'].shape}, the cache manifest says {tuple(shape)}")
        ns.append(rec["cls"])
        xn.append(rec["xn.npy"])
        xnext.append(rec["xnext.npy"])
        labels.append((rec.get("json") or {}).get("label"))
    if not ns:
        raise ShardError(f"the trajectory cache {shards} holds no pairs")
    labelled = [y is not None for y in labels]
    if any(labelled) and not all(labelled):
        raise ShardError(f"the trajectory cache {shards} mixes pairs with and without class labels; "
                         f"rebuild it with `dvc repro trajectories`")
    return (torch.tensor(ns), torch.from_numpy(np.stack(xn)), torch.from_numpy(np.stack(xnext)),
            torch.tensor(labels) if all(labelled) else None)


TRAJECTORY_FIX = "re-create the trajectory cache by rerunning the stage that wrote it (dvc repro -f)"


def load_trajectories(shard_paths: list[Path], shape=None, verify: bool = True,
                      record: Path | None = None):
    """Read a cache of whole trajectories into memory: (points float32 [N, P, C, H, W], sigmas
    float32 [P] (decreasing, shared by all), ends float32 [N, C, H, W] = points[:, -1], the clean
    ends, labels int64 [N] of a class-conditional teacher's cache, else None).

    With `verify`, every shard is first checked against the sha256 its cache.json (`record`, else
    the one beside the shards' folder) records; a changed shard is refused by name. `shape`
    (C, H, W), if given, must be every point's shape.
    """
    from cmpipe.sampling.dpm_solver import check_sigma_grid

    shards = [Path(p) for p in shard_paths]
    if not shards:
        raise ShardError("load_trajectories got no shard paths")
    if verify:
        verify_cache(shards, record, TRAJECTORY_FIX)
    points, labels, grid = [], [], None
    for rec in read_records(shards):
        where = f"shard {rec['__url__']} trajectory {rec['__key__']}"
        for k in ("points.npy", "sigmas.npy"):
            if k not in rec:
                raise ShardError(f"{where} has no {k} member; {TRAJECTORY_FIX}")
        pts, sg = rec["points.npy"], rec["sigmas.npy"]
        if pts.ndim != 4 or pts.shape[0] != sg.shape[0] or (shape is not None and pts.shape[1:] != tuple(shape)):
            raise ShardError(f"{where} has points of shape {pts.shape} at {sg.shape[0]} levels; expected "
                             f"levels x {tuple(shape) if shape is not None else 'C x H x W'}")
        if grid is None:
            grid = sg
            try:
                check_sigma_grid(grid, f"{where} sigmas")
            except ValueError as e:
                raise ShardError(str(e)) from None
        elif sg.shape != grid.shape or not (sg == grid).all():
            raise ShardError(f"{where} was computed on another grid of noise levels than the first "
                             f"trajectory; {TRAJECTORY_FIX}")
        points.append(pts)
        labels.append((rec.get("json") or {}).get("label"))
    if not points:
        raise ShardError(f"the trajectory cache {[str(s) for s in shards]} holds no trajectories")
    if len({p.shape for p in points}) > 1:
        raise ShardError(f"the trajectory cache {[str(s) for s in shards]} mixes point shapes "
                         f"{sorted({p.shape for p in points})}; {TRAJECTORY_FIX}")
    labelled = [y is not None for y in labels]
    if any(labelled) and not all(labelled):
        raise ShardError(f"the trajectory cache {[str(s) for s in shards]} mixes trajectories with and "
                         f"without class labels; {TRAJECTORY_FIX}")
    pts = torch.from_numpy(np.stack(points)).float()
    return (pts, torch.from_numpy(grid).float(), pts[:, -1].clone(),
            torch.tensor(labels) if all(labelled) else None)
