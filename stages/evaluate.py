"""DVC stage `evaluate`: FID and KID of every sample set against the fid_ref statistics.

    python -m stages.evaluate   (from the repository root; reads params.yaml section `evaluate`)

Inputs: data/fid_ref.npz (stage fid_ref), data/samples/sets.json and the
data/samples/<set>.npz files it lists (stage sample), each with `images`,
uint8 N x H x W x C.
Outputs: reports/metrics.json ({"fid": {set: x}, "kid": {set: x}, "protocol": {...}})
and reports/fid_vs_nfe.csv (set,kind,nfe,fid,kid,sampler), the data of the FID-vs-NFE plot
(one line per sampler: the `sampler` column colours .dvc/plots/fid_nfe.json).
Each set's Inception features are computed once and give both FID and KID.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import zipfile
from pathlib import Path

import numpy as np

from cmpipe.distributed import ddp as distributed
from cmpipe.metrics import fid as evaluation
from cmpipe.pipeline import params
from cmpipe.pipeline.layout import FID_PLOT as PLOT, FID_REF as REF, METRICS, SAMPLE_SETS as SETS, SAMPLES
from cmpipe.util.fileio import atomic_write_text
from cmpipe.weights import inception as assets

KINDS = ("cm", "teacher_heun", "teacher_euler", "teacher_dpm")
log = logging.getLogger("stages.evaluate")


class EvaluateError(ValueError):
    """An input of the evaluate stage is missing or inconsistent; the message names it."""


def read_sets(path: Path = SETS) -> dict[str, dict]:
    """sets.json, checked: {set_name: {"kind", "nfe", "count", ...}}."""
    if not path.is_file():
        raise EvaluateError(f"{path} not found: run the sample stage first (`dvc repro sample`)")
    try:
        sets = json.loads(path.read_text())
    except ValueError as e:
        raise EvaluateError(f"{path} is not valid JSON ({e}); rerun `dvc repro -f sample`")
    if not isinstance(sets, dict) or not sets:
        raise EvaluateError(f"{path} must map set names to their description and list at least one set")
    for name, info in sets.items():
        if not isinstance(info, dict):
            raise EvaluateError(f"{path}: set {name!r} must be an object with kind and nfe")
        if info.get("kind") not in KINDS:
            raise EvaluateError(f"{path}: set {name!r} has kind {info.get('kind')!r}, expected one of {KINDS}")
        nfe = info.get("nfe")
        if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
            raise EvaluateError(f"{path}: set {name!r} has nfe {nfe!r}, expected a positive integer")
        # The name is a file stem under data/samples/: no folders, no hidden files.
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise EvaluateError(f"{path}: set name {name!r} must be a plain file name stem")
    return sets


def load_set(name: str, info: dict, shape_hwc: tuple[int, int, int]) -> np.ndarray:
    """The images of one sample set, checked against the reference protocol's image shape."""
    path = SAMPLES / f"{name}.npz"
    if not path.is_file():
        raise EvaluateError(f"{path} not found but {SETS} lists set {name!r}; rerun `dvc repro sample`")
    try:
        with np.load(path, allow_pickle=False) as z:  # never unpickle: an object array is refused
            if "images" not in z.files:
                raise EvaluateError(f"{path} has no `images` array (arrays: {', '.join(z.files)}); "
                                    f"rerun `dvc repro -f sample`")
            images = z["images"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, EvaluateError):
            raise
        raise EvaluateError(f"{path}: unreadable sample set ({type(e).__name__}: {e}); "
                            f"rerun `dvc repro -f sample`") from None
    if not isinstance(images, np.ndarray):
        raise EvaluateError(f"{path}: not an .npz archive of arrays; rerun `dvc repro -f sample`")
    try:
        evaluation.validate_images(images, name=str(path))
    except (TypeError, ValueError) as e:
        raise EvaluateError(str(e))
    if tuple(images.shape[1:]) != tuple(shape_hwc):
        raise EvaluateError(
            f"{path}: images are {tuple(images.shape[1:])} (H x W x C) but the FID reference "
            f"{REF} was made from {tuple(shape_hwc)} images; FID across shapes is meaningless: "
            f"rerun `dvc repro` so that shard, sample and fid_ref agree")
    count = info.get("count")
    if count is not None and count != len(images):
        raise EvaluateError(f"{path} holds {len(images)} images but {SETS} says count {count} "
                            f"for set {name!r}; rerun `dvc repro -f sample`")
    return images


def set_features(images: np.ndarray, batch_size: int, model, name: str, dist) -> np.ndarray | None:
    """Inception features of a set; under torchrun batch b on rank b mod W, all of them on rank 0
    (None elsewhere), in the same batches as one process."""
    if not dist.enabled:
        return evaluation.inception_features(images, batch_size=batch_size, model=model, desc=f"evaluate {name}")
    starts = range(0, len(images), batch_size)
    parts = distributed.gather_in_order(
        dist, len(starts), lambda b: evaluation.inception_features(
            images[starts[b]:starts[b] + batch_size], batch_size=batch_size, model=model, progress=False,
            desc=f"evaluate {name} batch {b}"), REF, "evaluate")
    feats = list(parts)
    return np.concatenate(feats) if dist.is_main else None


def plot_rows(sets: dict, fids: dict, kids: dict) -> str:
    """CSV text of the FID-vs-NFE plot, one row per set, ordered by kind then NFE; `sampler` (the
    set's kind: cm, teacher_heun, teacher_euler, teacher_dpm) names the plot's line."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["set", "kind", "nfe", "fid", "kid", "sampler"])
    order = sorted(sets, key=lambda s: (KINDS.index(sets[s]["kind"]), sets[s]["nfe"], s))
    for s in order:
        w.writerow([s, sets[s]["kind"], sets[s]["nfe"], f"{fids[s]:.6g}", f"{kids[s]:.6g}", sets[s]["kind"]])
    return buf.getvalue()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        p = params.load("evaluate")  # validates every key before any work
        try:
            ref = evaluation.load_reference(REF)
        except ValueError as e:  # a file of the wrong layout
            raise EvaluateError(str(e))
        proto = ref["protocol"]
        if proto.get("mode") != evaluation.MODE:
            raise EvaluateError(f"{REF} was made in mode {proto.get('mode')!r}, not "
                                f"{evaluation.MODE!r}; rerun `dvc repro -f fid_ref`")
        shape_hwc = tuple(proto["shape_hwc"])
        sets = read_sets()
        unlisted = sorted({f.stem for f in SAMPLES.glob("*.npz")} - set(sets))
        if unlisted:
            log.warning("ignoring %s: not listed in %s", ", ".join(unlisted), SETS)
        # Load and check every set before the first (slow) Inception pass.
        images = {name: load_set(name, info, shape_hwc) for name, info in sets.items()}

        inception = assets.inception_info()
        if inception["sha1"] != proto["inception"]["sha1"]:
            # NVIDIA's file and the converted one hold the same network: features agree
            # to float rounding, so this is worth a note, not a failure.
            log.warning("Inception file differs from the one of %s (%s, %s vs %s, %s)", REF,
                        inception["origin"], inception["sha1"][:12], proto["inception"]["origin"],
                        proto["inception"]["sha1"][:12])
        dist = distributed.init()
        model = evaluation.build_inception(dist.device(evaluation.default_device()))
        n_ref = len(ref["features"])
        fids, kids, counts, subset_sizes = {}, {}, {}, {}
        for name, imgs in images.items():
            feats = set_features(imgs, p.batch_size, model, name, dist)
            if not dist.is_main:
                continue
            try:
                fids[name] = evaluation.fid(feats, ref["mu"], ref["sigma"])
            except ValueError as e:
                raise EvaluateError(f"set {name!r} ({SAMPLES / name}.npz): {e}")
            subset_sizes[name] = min(p.kid_subset_size, len(feats), n_ref)
            kids[name] = evaluation.kid(feats, ref["features"], num_subsets=p.kid_subsets,
                                        max_subset_size=subset_sizes[name])
            counts[name] = len(feats)
            log.info("%s: FID %.3f  KID %.5f  (%d images, NFE %d)", name, fids[name], kids[name],
                     len(feats), sets[name]["nfe"])

        metrics = {
            "fid": fids,
            "kid": kids,
            "protocol": {
                "mode": evaluation.MODE,
                "samples_per_set": counts,
                "reference_split": proto["split"],
                "reference_count": n_ref,
                "kid_subsets": p.kid_subsets,
                "kid_subset_size": subset_sizes,
                "inception": proto["inception"],
                "cleanfid_version": evaluation.cleanfid_version(),
                "device": model.device.type,
            },
        }
        if not dist.is_main:  # rank 0 alone writes the metrics
            return
        atomic_write_text(PLOT, plot_rows(sets, fids, kids))
        atomic_write_text(METRICS, json.dumps(metrics, indent=2, sort_keys=False) + "\n")
        log.info("wrote %s and %s", METRICS, PLOT)
    except (params.ParamsError, EvaluateError, FileNotFoundError, assets.MissingAssetError) as e:
        # A user-facing problem (params, missing or inconsistent inputs): its message says what to fix.
        raise SystemExit(f"evaluate: {e}")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
