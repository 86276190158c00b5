"""DVC stage `copy_check`: are the one-step samples new images, or copies of what training saw?

    python -m stages.copy_check

A cache reuses each teacher trajectory's clean end many times, and a one-step model that learned
to copy those ends would score a fine FID and be worthless. For the consistency model's 1-step set
and, as the yardstick, the teacher's Heun sets, this stage gives the distance of every sample to
its nearest cached clean end (data/whole_trajectories, made when distill.init is midtrain) and to its
nearest training image (data/shards): per-pixel RMS in [-1, 1] (metrics.copy_check), summarised
by median, mean, 10th percentile and minimum. Output reports/copy_check.json, with each
reference's ratio of the consistency model's median to the teacher's (below 1: nearer than the
teacher's own samples are). No params.
"""
from __future__ import annotations

import json
import logging

from cmpipe.data import load_image_split, read_manifest
from cmpipe.metrics.copy_check import copy_check
from cmpipe.pipeline.layout import COPY_CHECK as OUT, MANIFEST, SAMPLE_SETS, SAMPLES, WHOLE_TRAJECTORIES
from cmpipe.pipeline.stage import run_stage
from cmpipe.sampling.kinds import read_sets, set_file
from cmpipe.sampling.scores import load_set
from cmpipe.training.trajectories import load_trajectories
from cmpipe.util.fileio import atomic_write_json

log = logging.getLogger("stages.copy_check")


def main():
    sets = read_sets(SAMPLE_SETS)
    checked = [n for n, i in sets.items() if (i["kind"], i["nfe"]) == ("cm", 1) or i["kind"] == "teacher_heun"]
    c, h, w = read_manifest(MANIFEST)["shape"]
    references = {"training_images": (load_image_split(MANIFEST, role="train")[0], "NCHW")}
    cache = json.loads((WHOLE_TRAJECTORIES / "cache.json").read_text())
    if not cache.get("unused"):
        ends = load_trajectories([s["path"] for s in cache["shards"]], (c, h, w))[2]
        references["cached_ends"] = (ends, "NCHW")
    report = {"distance": "per-pixel RMS in [-1, 1]", "sets": {},
              "references": {k: len(v[0]) for k, v in references.items()},
              "no_cache": cache.get("unused")}
    for name in checked:
        images = load_set(set_file(SAMPLES, name), name, sets[name], (h, w, c), SAMPLE_SETS, MANIFEST)
        report["sets"][name] = {ref: copy_check(images, x, references_layout=layout)
                                for ref, (x, layout) in references.items()}
        log.info("%s: median nearest distance %s", name,
                 ", ".join(f"{r} {v['median']:.4f}" for r, v in report["sets"][name].items()))
    cm = [n for n in checked if sets[n]["kind"] == "cm"]
    heun = [n for n in checked if sets[n]["kind"] == "teacher_heun"]
    if cm and heun:  # the consistency model against the teacher's most accurate Heun set
        best = max(heun, key=lambda n: sets[n]["nfe"])
        report["ratio_to_teacher"] = {"against": best, **{
            ref: report["sets"][cm[0]][ref]["median"] / report["sets"][best][ref]["median"] for ref in references}}
    atomic_write_json(OUT, report)
    log.info("wrote %s", OUT)


if __name__ == "__main__":
    run_stage("copy_check", main)
