"""DVC stage `fid_ref`: Inception features of real images, with their mean and covariance.

    python -m stages.fid_ref    (from the repository root; reads params.yaml section `fid_ref`)

Input: data/shards/manifest.json and the shards of the split whose role is `ref`.
Output: data/fid_ref.npz with `features` (float32 N x 2048), `mu`, `sigma` (float64)
and `protocol` (a JSON string: mode, split, count, image shape, Inception file),
so that the evaluate stage never recomputes the reference and can check that
sample sets are comparable with it.
"""
from __future__ import annotations

import logging
import time

from cmpipe.data import ShardError, load_image_split, read_manifest
from cmpipe.metrics import fid as evaluation
from cmpipe.pipeline import params
from cmpipe.pipeline.layout import FID_REF as OUT, MANIFEST
from cmpipe.pipeline.stage import run_stage
from cmpipe.weights import inception as assets

log = logging.getLogger("stages.fid_ref")


def main() -> None:
    p = params.load("fid_ref")  # validates every key before any work
    manifest = read_manifest(MANIFEST)
    split = manifest["roles"].get("ref")
    if split not in manifest["splits"]:
        raise ShardError(f"{MANIFEST}: role 'ref' names split {split!r}, which the manifest "
                         f"lacks (splits: {', '.join(manifest['splits'])}); rerun `dvc repro shard`")
    available = manifest["splits"][split]["count"]
    if p.count > available:
        raise params.ParamsError(
            f"params.yaml: fid_ref.count = {p.count} exceeds the {available} images of the "
            f"reference split {split!r} ({MANIFEST}); lower fid_ref.count or use a larger "
            f"split (shard.ref_split, shard.limit)")
    # Resolve (and if needed convert) the Inception file before reading any image.
    inception = assets.inception_info()
    model = evaluation.build_inception(evaluation.default_device())

    t0 = time.perf_counter()
    images, _labels = load_image_split(MANIFEST, role="ref", limit=p.count)
    if len(images) != p.count:
        raise ShardError(f"{MANIFEST}: split {split!r} gave {len(images)} images, expected {p.count}")
    images = images.permute(0, 2, 3, 1).contiguous().numpy()  # N x C x H x W -> N x H x W x C
    log.info("read %d images of split %s, shape %s, in %.1fs", len(images), split,
             tuple(images.shape[1:]), time.perf_counter() - t0)

    feats = evaluation.inception_features(images, batch_size=p.batch_size, model=model,
                                          desc=f"fid_ref {split}")
    c, h, w = manifest["shape"]
    protocol = {
        "mode": evaluation.MODE,
        "split": split,
        "count": int(p.count),
        "resolution": h if h == w else [h, w],
        "shape_hwc": [h, w, c],
        "channels": c,
        "feature_dim": evaluation.FEATURE_DIM,
        "inception": {k: inception[k] for k in ("name", "sha1", "origin")},
        "cleanfid_version": evaluation.cleanfid_version(),
        "device": model.device.type,
    }
    ref = evaluation.save_reference(OUT, feats, protocol)
    log.info("wrote %s: %d features, trace(sigma) %.2f", OUT, len(feats), float(ref["sigma"].trace()))


if __name__ == "__main__":
    run_stage("fid_ref", main)
