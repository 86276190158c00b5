"""DVC stage `evaluate`: FID and KID of every sample set against the fid_ref statistics.

    python -m stages.evaluate   (from the repository root; reads params.yaml section `evaluate`)

Inputs: data/fid_ref.npz (stage fid_ref), data/samples/sets.json and the
data/samples/<set>.npz files it lists (stage sample), each with `images`,
uint8 N x H x W x C.
Outputs: reports/metrics.json ({"fid": {set: x}, "kid": {set: x}, "protocol": {...}})
and reports/fid_vs_nfe.csv (set,kind,nfe,fid,kid,sampler), the data of the FID-vs-NFE plot
(one line per sampler: the `sampler` column colours .dvc/plots/fid_nfe.json).
The work is `cmpipe.sampling.scores`.
"""
from __future__ import annotations

import json
import logging

from cmpipe.distributed import ddp as distributed
from cmpipe.metrics import fid as evaluation
from cmpipe.pipeline import params
from cmpipe.pipeline.layout import FID_PLOT as PLOT, FID_REF as REF, METRICS, SAMPLE_SETS as SETS, SAMPLES
from cmpipe.pipeline.stage import run_stage
from cmpipe.sampling.kinds import read_sets, set_file
from cmpipe.sampling.scores import load_reference, load_set, note_other_inception, plot_rows, score_sets
from cmpipe.util.fileio import atomic_write_text

log = logging.getLogger("stages.evaluate")


def main() -> None:
    p = params.load("evaluate")  # validates every key before any work
    ref = load_reference(REF)
    shape_hwc = tuple(ref["protocol"]["shape_hwc"])
    sets = read_sets(SETS)
    unlisted = sorted({f.stem for f in SAMPLES.glob("*.npz")} - set(sets))
    if unlisted:
        log.warning("ignoring %s: not listed in %s", ", ".join(unlisted), SETS)
    # Load and check every set before the first (slow) Inception pass.
    images = {name: load_set(set_file(SAMPLES, name), name, info, shape_hwc, SETS, REF)
              for name, info in sets.items()}
    note_other_inception(ref, REF)
    dist = distributed.init()
    model = evaluation.build_inception(dist.device(evaluation.default_device()))
    metrics = score_sets(images, sets, ref, model, p, dist, SAMPLES, parts_dir=REF)
    if metrics is None:  # rank 0 alone writes the metrics
        return
    atomic_write_text(PLOT, plot_rows(sets, metrics["fid"], metrics["kid"]))
    atomic_write_text(METRICS, json.dumps(metrics, indent=2, sort_keys=False) + "\n")
    log.info("wrote %s and %s", METRICS, PLOT)


if __name__ == "__main__":
    run_stage("evaluate", main)
