"""DVC stage `shard`: read the source dataset, write webdataset shards and their manifest.

    python -m stages.shard      (from the repository root; reads params.yaml section `shard`)

Outputs: data/shards/<split>/shard-%06d.tar for every split of the source, and
data/shards/manifest.json (counts, shape, class names, roles, sha256 of every shard).
The same params give byte-identical outputs.
"""
from __future__ import annotations

import logging
import time

from cmpipe.data import check_roles, list_splits, load_source_from_params, write_dataset
from cmpipe.pipeline import params
from cmpipe.pipeline.layout import SHARDS as OUT_DIR
from cmpipe.pipeline.stage import run_stage

log = logging.getLogger("stages.shard")


def main() -> None:
    p = params.load("shard")  # validates every key before any work
    # Check the roles against the source's splits before reading a single image.
    check_roles(p.train_split, p.ref_split, list_splits(p.source, p.path), p.holdout)
    t0 = time.perf_counter()
    data = load_source_from_params(p)
    log.info("read %s from %s: %s in %.1fs", p.source, p.path,
             ", ".join(f"{k} {len(s.images)}" for k, s in data.splits.items()),
             time.perf_counter() - t0)
    t0 = time.perf_counter()
    manifest = write_dataset(data, OUT_DIR, p.images_per_shard,
                             roles={"train": p.train_split, "ref": p.ref_split})
    log.info("wrote %d split(s) of shape %s in %.1fs", len(manifest["splits"]), manifest["shape"],
             time.perf_counter() - t0)


if __name__ == "__main__":
    run_stage("shard", main)
