"""FID and KID of the sample sets against the fid_ref statistics, and the FID-vs-NFE plot's data.

Each set's Inception features are computed once and give both FID and KID. Every set is loaded
and checked against the reference's image shape before the first (slow) Inception pass.
"""
from __future__ import annotations

import csv
import io
import logging
import zipfile
from pathlib import Path

import numpy as np

from cmpipe.distributed import ddp as distributed
from cmpipe.errors import InputError
from cmpipe.metrics import fid as evaluation
from cmpipe.sampling.kinds import kind_order, set_file

log = logging.getLogger(__name__)


def load_reference(path: Path) -> dict:
    """The fid_ref statistics (`metrics.fid.load_reference`), checked to be of this FID's mode."""
    try:
        ref = evaluation.load_reference(path)
    except (FileNotFoundError, ValueError) as e:  # missing, or a file of the wrong layout
        raise InputError(str(e)) from None
    mode = ref["protocol"].get("mode")
    if mode != evaluation.MODE:
        raise InputError(f"{path} was made in mode {mode!r}, not {evaluation.MODE!r}; "
                         f"rerun `dvc repro -f fid_ref`")
    return ref


def load_set(path: Path, name: str, info: dict, shape_hwc: tuple[int, int, int], sets_path: Path,
             ref_path: Path) -> np.ndarray:
    """The images of set `name` (file `path`, listed in `sets_path` as `info`), checked against the
    image shape of the reference `ref_path`'s protocol."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found but {sets_path} lists set {name!r}; rerun `dvc repro sample`")
    try:
        with np.load(path, allow_pickle=False) as z:  # never unpickle: an object array is refused
            if "images" not in z.files:
                raise InputError(f"{path} has no `images` array (arrays: {', '.join(z.files)}); "
                                 f"rerun `dvc repro -f sample`")
            images = z["images"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: unreadable sample set ({type(e).__name__}: {e}); "
                         f"rerun `dvc repro -f sample`") from None
    if not isinstance(images, np.ndarray):
        raise InputError(f"{path}: not an .npz archive of arrays; rerun `dvc repro -f sample`")
    try:
        evaluation.validate_images(images, name=str(path))
    except (TypeError, ValueError) as e:
        raise InputError(str(e))
    if tuple(images.shape[1:]) != tuple(shape_hwc):
        raise InputError(
            f"{path}: images are {tuple(images.shape[1:])} (H x W x C) but the FID reference "
            f"{ref_path} was made from {tuple(shape_hwc)} images; FID across shapes is meaningless: "
            f"rerun `dvc repro` so that shard, sample and fid_ref agree")
    count = info.get("count")
    if count is not None and count != len(images):
        raise InputError(f"{path} holds {len(images)} images but {sets_path} says count {count} "
                         f"for set {name!r}; rerun `dvc repro -f sample`")
    return images


def note_other_inception(ref: dict, ref_path: Path):
    """Log a warning when the Inception file differs from the reference's: NVIDIA's file and the
    converted one hold the same network, features agree to float rounding, so it is not a failure."""
    from cmpipe.weights import inception as assets

    mine, theirs = assets.inception_info(), ref["protocol"]["inception"]
    if mine["sha1"] != theirs["sha1"]:
        log.warning("Inception file differs from the one of %s (%s, %s vs %s, %s)", ref_path, mine["origin"],
                    mine["sha1"][:12], theirs["origin"], theirs["sha1"][:12])

def set_features(images: np.ndarray, batch_size: int, model, name: str, dist, parts_dir: Path) -> np.ndarray | None:
    """Inception features of a set; under torchrun batch b on rank b mod W, all of them on rank 0
    (None elsewhere; the parts pass through beside `parts_dir`), in the same batches as one process."""
    if not dist.enabled:
        return evaluation.inception_features(images, batch_size=batch_size, model=model, desc=f"evaluate {name}")
    starts = range(0, len(images), batch_size)
    parts = distributed.gather_in_order(
        dist, len(starts), lambda b: evaluation.inception_features(
            images[starts[b]:starts[b] + batch_size], batch_size=batch_size, model=model, progress=False,
            desc=f"evaluate {name} batch {b}"), parts_dir, "evaluate")
    feats = list(parts)
    return np.concatenate(feats) if dist.is_main else None


def score_sets(images: dict[str, np.ndarray], sets: dict[str, dict], ref: dict, model, e, dist,
               samples_dir: Path, parts_dir: Path) -> dict | None:
    """metrics.json's content: {"fid": {set: x}, "kid": {set: x}, "protocol": {...}} for the params
    `e` (section evaluate: batch_size, kid_subsets, kid_subset_size); None on ranks other than 0."""
    proto = ref["protocol"]
    n_ref = len(ref["features"])
    fids, kids, counts, subset_sizes = {}, {}, {}, {}
    for name, imgs in images.items():
        feats = set_features(imgs, e.batch_size, model, name, dist, parts_dir)
        if not dist.is_main:
            continue
        try:
            fids[name] = evaluation.fid(feats, ref["mu"], ref["sigma"])
        except ValueError as err:
            raise InputError(f"set {name!r} ({set_file(samples_dir, name)}): {err}")
        subset_sizes[name] = min(e.kid_subset_size, len(feats), n_ref)
        kids[name] = evaluation.kid(feats, ref["features"], num_subsets=e.kid_subsets,
                                    max_subset_size=subset_sizes[name])
        counts[name] = len(feats)
        log.info("%s: FID %.3f  KID %.5f  (%d images, NFE %d)", name, fids[name], kids[name],
                 len(feats), sets[name]["nfe"])
    if not dist.is_main:
        return None
    return {
        "fid": fids,
        "kid": kids,
        "protocol": {
            "mode": evaluation.MODE,
            "samples_per_set": counts,
            "reference_split": proto["split"],
            "reference_count": n_ref,
            "kid_subsets": e.kid_subsets,
            "kid_subset_size": subset_sizes,
            "inception": proto["inception"],
            "cleanfid_version": evaluation.cleanfid_version(),
            "device": model.device.type,
        },
    }


def plot_rows(sets: dict, fids: dict, kids: dict) -> str:
    """CSV text of the FID-vs-NFE plot, one row per set, ordered by kind then NFE; `sampler` (the
    set's kind: cm, teacher_heun, teacher_euler, teacher_dpm) names the plot's line."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["set", "kind", "nfe", "fid", "kid", "sampler"])
    for s in kind_order(sets):
        w.writerow([s, sets[s]["kind"], sets[s]["nfe"], f"{fids[s]:.6g}", f"{kids[s]:.6g}", sets[s]["kind"]])
    return buf.getvalue()
