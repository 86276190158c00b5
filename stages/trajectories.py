"""DVC stage `trajectories`: the teacher's ODE solutions, computed once for the stages that learn from them.

    python -m stages.trajectories

Reads params `trajectories`, `diffusion` and distill.{mode, pairs, init, images}; inputs data/shards and
data/teacher/model.pt; outputs two caches (pipeline.trajectory_cache) and reports/trajectories.json
(pairs/s, trajectories/s, points/s): data/trajectories, CD's Heun pairs (shards of key, n, x_n,
x_hat_{n+1}, and cache.json), when distill.mode is cd and distill.pairs cache; and
data/whole_trajectories, the teacher's whole DPM-Solver++(2M) trajectories of trajectories.nfe
steps on the logSNR-uniform grid (every point, its sigma, the clean end), when distill.init is
midtrain. A cache nobody reads is an empty cache.json that says why; two outputs, so that a change
of one cache re-runs only its reader.
"""
from __future__ import annotations

import logging

from cmpipe.data import load_image_split, read_manifest, sha256_file
from cmpipe.distributed import ddp as distributed
from cmpipe.models.teachers import load_teacher
from cmpipe.pipeline import params
from cmpipe.pipeline.config import sigmas_from
from cmpipe.pipeline.layout import MANIFEST, TEACHER, TRAJECTORIES as OUT, TRAJECTORIES_REPORT as REPORT, \
    WHOLE_TRAJECTORIES as WHOLE
from cmpipe.pipeline.stage import run_stage
from cmpipe.pipeline.trajectory_cache import midtrain_grid, pairs_unused_because, whole_unused_because, \
    write_cache, write_unused
from cmpipe.training.trajectories import compute_pairs, compute_trajectories
from cmpipe.util.fileio import atomic_write_json

log = logging.getLogger("stages.trajectories")


def main():
    p = params.load_many("trajectories", "diffusion", "distill")
    t, sig = p.trajectories, sigmas_from(p.diffusion)
    shape = read_manifest(MANIFEST)["shape"]
    skip_pairs, skip_whole = pairs_unused_because(p.distill), whole_unused_because(p.distill)
    dist = distributed.init(t.device)
    device = dist.device(t.device)
    teacher = None if skip_pairs and skip_whole else load_teacher(TEACHER, sig.sigma_data, device)
    teacher_sha256 = sha256_file(TEACHER) if teacher else None
    report = {"device": device.type, "bf16": bool(t.bf16 and device.type == "cuda"), "processes": dist.world}
    if t.bf16 and device.type != "cuda" and teacher:
        log.info("trajectories.bf16 is on but has no effect on %s (CUDA only); set it to false to silence this", device)
    if skip_pairs:
        log.info("no Heun pairs: %s, which does not read them", skip_pairs)
        write_unused(OUT, skip_pairs)
        report.update(pairs=0, unused=skip_pairs)
    else:
        images, labels = load_image_split(MANIFEST, role="train")
        conditional = teacher.num_classes is not None  # the teacher's classes are the images' labels
        log.info("caching %d Heun pairs on the %d-point grid on %s", t.num_pairs, sig.num_scales, device)
        pairs = compute_pairs(teacher, images, t.num_pairs, t.seed, sig, t.batch_size, device, t.bf16,
                              labels=labels if conditional else None, dist=dist, parts_dir=OUT)
        done = write_cache(OUT, pairs, t.num_pairs, t.images_per_shard, "pairs", dist, shape=shape,
                           num_scales=sig.num_scales, sigmas=[sig.sigma_min, sig.sigma_max, sig.rho], seed=t.seed,
                           teacher_sha256=teacher_sha256)
        if done:
            report.update(pairs=t.num_pairs, seconds=done["seconds"],
                          pairs_per_sec=round(t.num_pairs / done["seconds"], 2))
    if skip_whole:
        write_unused(WHOLE, skip_whole)
        report["trajectories"] = {"count": 0, "unused": skip_whole}
    else:
        grid = midtrain_grid(t.nfe, sig)
        log.info("caching %d DPM-Solver++ trajectories of %d NFE (sigma %s) on %s", t.num_trajectories, t.nfe,
                 " ".join(f"{s:.3g}" for s in grid.tolist()), device)
        records = compute_trajectories(teacher, t.num_trajectories, t.seed, grid, shape, t.batch_size, device,
                                       parts_dir=WHOLE, sigma_data=sig.sigma_data, bf16=t.bf16, dist=dist)
        done = write_cache(WHOLE, records, t.num_trajectories, t.images_per_shard, "trajectories", dist,
                           shape=shape, nfe=t.nfe, grid=grid.tolist(), seed=t.seed, teacher_sha256=teacher_sha256)
        if done:
            per_s = t.num_trajectories / done["seconds"]
            report["trajectories"] = {"count": t.num_trajectories, "nfe": t.nfe, "seconds": done["seconds"],
                                      "trajectories_per_sec": round(per_s, 2),
                                      "points_per_sec": round(per_s * (t.nfe + 1), 2)}
    if dist.is_main:
        atomic_write_json(REPORT, report)
        log.info("trajectories: %s", report)


if __name__ == "__main__":
    run_stage("trajectories", main)
