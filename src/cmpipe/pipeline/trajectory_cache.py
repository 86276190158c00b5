"""The two teacher-trajectory caches of the trajectories stage, and who reads them.

* Pairs (CD, Song et al. 2023, Algorithm 2): adjacent Heun points (n, x_n, x_hat_{n+1}), read by
  distill with mode cd and pairs cache.
* Whole trajectories (CMT, Hu et al. 2026): every point of the teacher's DPM-Solver++(2M) run on the
  logSNR-uniform grid from sigma_max to sigma_min, and its clean end, read by midtrain when
  distill.init is midtrain.

A cache nobody reads is a `cache.json` that says why, written in no time; each written cache lists
its shards with their sha256, which the readers check.
"""
from __future__ import annotations

import collections
import json
import time
from pathlib import Path

from cmpipe.cm.karras import Sigmas, logsnr_sigmas
from cmpipe.data import ShardError, write_shards
from cmpipe.util.fileio import atomic_write_json
from cmpipe.util.hashing import sha256_file


def pairs_unused_because(d) -> str | None:
    """Why distill will not read Heun pairs (params `distill`), or None when it will."""
    if d.images == 0:
        return "distill.images is 0 (no post-training)"
    if d.mode != "cd":
        return f"distill.mode is {d.mode}"
    if d.pairs != "cache":
        return f"distill.pairs is {d.pairs}"
    return None


def whole_unused_because(d) -> str | None:
    """Why no stage will read whole trajectories (params `distill`), or None when midtrain will (it
    reads them unless midtrain.pairs is online, a midtrain key that must not re-run this stage)."""
    if d.init != "midtrain":
        return f"distill.init is {d.init}"
    return None


def midtrain_grid(nfe: int, sig: Sigmas):
    """CMT's grid of an nfe-step trajectory, float32 as the cache stores it."""
    import torch

    return logsnr_sigmas(nfe, sig.sigma_min, sig.sigma_max).to(torch.float32)


def write_unused(out: Path, why: str):
    atomic_write_json(Path(out) / "cache.json", {"count": 0, "unused": why, "shards": []})


def write_cache(out: Path, records, count: int, per_shard: int, prefix: str, dist, **about) -> dict:
    """Write the records (an iterator over every rank's batches; rank 0 yields them all) as shards
    under out/shards and out/cache.json listing them with their sha256 and `about`; returns
    {count, seconds} on rank 0, None on the others."""
    t0 = time.perf_counter()
    if not dist.is_main:  # its batches went to rank 0, which writes the cache
        collections.deque(records, maxlen=0)
        return None
    shards = write_shards(Path(out) / "shards", records, maxcount=per_shard, prefix=prefix)
    atomic_write_json(Path(out) / "cache.json", {
        "count": count, **about, "shards": [{"path": str(s), "sha256": sha256_file(s)} for s in shards]})
    return {"count": count, "seconds": round(time.perf_counter() - t0, 2)}


def read_cache(cache_dir: Path, holds: str, needs: str) -> dict:
    """cache.json of a cache, refused when it is missing or was written as unused (`holds`: what the
    reader wanted; `needs`: the params that make the stage write it)."""
    cache_file = Path(cache_dir) / "cache.json"
    if not cache_file.exists():
        raise ShardError(f"{cache_file} not found: run `dvc repro trajectories` first")
    cache = json.loads(cache_file.read_text())
    if cache.get("unused"):
        raise ShardError(f"{cache_file} holds no {holds}: the trajectories stage ran while {cache['unused']}; run "
                         f"`dvc repro trajectories` with {needs}")
    return cache
