"""The teacher-trajectory cache of consistency distillation.

Pair i holds a grid index n, x_n = x + sigma_n z and the teacher's Heun step
x_hat_{n+1} from sigma_n to sigma_{n+1} (Song et al. 2023, Algorithm 2). Its
image, n and z come from a generator seeded with (seed, i), so the cache does
not depend on the batch size or the number of processes that computed it.
Distillation then reads pairs instead of running the teacher (about 1.5x faster
per step, docs/design.md §4), and experiments on distillation settings reuse it.
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
                  dist: Dist = SINGLE, parts_dir: Path | None = None) -> Iterator[dict]:
    """Yield records {"__key__", "cls": n, "json": {"image"}, "xn.npy", "xnext.npy"} in pair order.

    With `labels` (the class of each training image) the teacher is class-conditional: it is
    given the image's class, and the class is stored in the record's json as "label".
    Under torchrun (`dist`), batch b is computed by rank b mod W (the same batches as one
    process) and rank 0 yields them all in order; the other ranks yield nothing.
    """
    indices = indices if indices is not None else range(num_pairs)
    batches = [indices[s:s + batch_size] for s in range(0, len(indices), batch_size)]
    bar = tqdm(total=len(dist.my_batches(len(batches))), desc="trajectories", unit="batch", mininterval=2.0)

    def compute(b):
        recs = pair_batch(teacher, images_uint8, batches[b], seed, sig, device, bf16, labels)
        bar.update()
        return recs

    for recs in gather_in_order(dist, len(batches), compute, parts_dir or Path("data/trajectories"),
                                "trajectories"):
        yield from recs
    bar.close()


@torch.inference_mode()
def pair_batch(teacher, images_uint8: torch.Tensor, idx, seed: int, sig: Sigmas, device: torch.device,
               bf16: bool = False, labels: torch.Tensor | None = None) -> list[dict]:
    """The records of the pairs `idx` (one batch of the teacher)."""
    grid = sig.grid().float()
    shape = tuple(images_uint8.shape[1:])
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda"
                else contextlib.nullcontext())
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


CACHE_FIX = "re-create the cache with `dvc repro -f trajectories` (or restore it with `dvc checkout data/trajectories`)"


def verify_cache(shards: list[Path], record: Path | None = None) -> None:
    """Check each shard against the sha256 the cache's `cache.json` records for it (found beside
    the shards' folder unless given); shards it does not list are refused."""
    shards = [Path(s) for s in shards]
    if record is None:
        record = shards[0].parent.parent / "cache.json" if shards else None
    if record is None or not record.is_file():
        return  # a bare list of shards (tests, benchmarks): no record to check against
    try:
        listed = {str(Path(e["path"])): e["sha256"] for e in json.loads(record.read_text())["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardError(f"{record}: unreadable cache record ({type(e).__name__}: {e}); {CACHE_FIX}") from None
    for s in shards:
        expected = listed.get(str(s))
        if expected is None:
            raise ShardError(f"{s} is not one of the shards {record} lists; {CACHE_FIX}")
        check_sha256(s, expected, record, CACHE_FIX, error=ShardError)


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
