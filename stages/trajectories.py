"""DVC stage `trajectories`: the teacher's adjacent PF-ODE points, computed once for CD.

    python -m stages.trajectories

Reads params `trajectories`, `diffusion` and distill.{mode, pairs}; inputs data/shards and
data/teacher/model.pt; outputs data/trajectories/ (webdataset shards of key, n, x_n, x_hat_{n+1}
and cache.json) and reports/trajectories.json (pairs per second). Only CD from the cache reads
the pairs: with distill.mode ct or ect, or distill.pairs online, the stage writes an empty cache
that says why, in seconds.
"""
from __future__ import annotations

import collections
import logging
import time

from cmpipe.data import load_image_split, read_manifest, sha256_file, write_shards
from cmpipe.distributed import ddp as distributed
from cmpipe.pipeline import params
from cmpipe.pipeline.config import sigmas_from
from cmpipe.pipeline.layout import MANIFEST, TEACHER, TRAJECTORIES as OUT, TRAJECTORIES_REPORT as REPORT
from cmpipe.pipeline.stage import run_stage
from cmpipe.models.teachers import load_teacher
from cmpipe.training.trajectories import compute_pairs
from cmpipe.util.fileio import atomic_write_json

log = logging.getLogger("stages.trajectories")


def unused_because(d) -> str | None:
    """Why distill will not read a cache (params `distill`), or None when it will."""
    if d.mode != "cd":
        return f"distill.mode is {d.mode}"
    if d.pairs != "cache":
        return f"distill.pairs is {d.pairs}"
    return None


def main():
    p = params.load_many("trajectories", "diffusion", "distill")
    t, sig = p.trajectories, sigmas_from(p.diffusion)
    manifest = read_manifest(MANIFEST)
    skip = unused_because(p.distill)
    if skip:
        log.info("no trajectory cache: %s, which does not read one", skip)
        atomic_write_json(OUT / "cache.json", {"count": 0, "unused": skip, "shards": []})
        atomic_write_json(REPORT, {"pairs": 0, "unused": skip})
        return
    dist = distributed.init(t.device)
    device = dist.device(t.device)
    teacher = load_teacher(TEACHER, sig.sigma_data, device)
    images, labels = load_image_split(MANIFEST, role="train")
    conditional = teacher.num_classes is not None  # the teacher's classes are the images' labels
    log.info("caching %d pairs on the %d-point grid with the %s teacher on %s", t.num_pairs, sig.num_scales,
             "class-conditional" if conditional else "unconditional", device)

    t0 = time.perf_counter()
    pairs = compute_pairs(teacher, images, t.num_pairs, t.seed, sig, t.batch_size, device, t.bf16,
                          labels=labels if conditional else None, dist=dist, parts_dir=OUT)
    if not dist.is_main:  # its batches went to rank 0, which writes the cache
        collections.deque(pairs, maxlen=0)
        return
    shards = write_shards(OUT / "shards", pairs, maxcount=t.images_per_shard, prefix="pairs")
    seconds = time.perf_counter() - t0
    atomic_write_json(OUT / "cache.json", {
        "count": t.num_pairs, "shape": manifest["shape"], "num_scales": sig.num_scales,
        "sigmas": [sig.sigma_min, sig.sigma_max, sig.rho], "seed": t.seed,
        "teacher_sha256": sha256_file(TEACHER),
        "shards": [{"path": str(s), "sha256": sha256_file(s)} for s in shards]})
    atomic_write_json(REPORT, {"pairs": t.num_pairs, "seconds": round(seconds, 2),
                               "pairs_per_sec": round(t.num_pairs / seconds, 2), "device": device.type,
                               "bf16": bool(t.bf16 and device.type == "cuda"), "processes": dist.world})
    log.info("%d pairs in %.1fs: %.1f pairs/s", t.num_pairs, seconds, t.num_pairs / seconds)


if __name__ == "__main__":
    run_stage("trajectories", main)
