"""CIFAR-10 in torchvision's layout (`path/cifar-10-batches-py`), read here, not by torchvision.

torchvision's `CIFAR10` refuses any file whose md5 is not the official one, so a subset or a
re-pickled copy (the test suite's small copy included) could not be read; it also unpickles with
the full `pickle.load`. Here each batch is unpickled by `cmpipe.util.numpy_pickle.NumpyUnpickler`,
which can rebuild a numpy array and nothing else (no callable of the file's choosing runs), and checked for its
shape: `data` uint8 N×3072 (the planes R, G, B of 32×32, row-major) and `labels` N classes
0..9. Files that are not the official ones (md5) are read all the same, with a log line that
says so: FIDs against them are not comparable with the published ones.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from cmpipe.data.base import DataError, SourceData, Split
from cmpipe.util.numpy_pickle import NumpyUnpickler

log = logging.getLogger(__name__)

LAYOUT = "cifar-10-batches-py"
# file: md5 of the official python version (as torchvision.datasets.CIFAR10 lists them)
TRAIN = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
}
TEST = {"test_batch": "40351d587109b95175f43aff81a1287e"}
META = ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888")
SPLIT_FILES = {"train": TRAIN, "test": TEST}


def _load(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            # latin1: the official files are Python 2 pickles (str keys, numpy arrays in them)
            entry = NumpyUnpickler(f, encoding="latin1").load()
    except OSError as e:
        raise DataError(f"CIFAR-10: cannot read {path} ({e})")
    except Exception as e:  # UnpicklingError, EOFError, ...: not a batch file
        raise DataError(f"CIFAR-10: {path} is not a CIFAR-10 batch pickle ({type(e).__name__}: {e}); "
                        f"restore the file or set shard.download: true")
    if not isinstance(entry, dict):
        raise DataError(f"CIFAR-10: {path} holds a {type(entry).__name__}, not a batch dict")
    # keys are str in the official (Python 2) files, bytes in a Python 3 pickle of b"data"
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    entry = _load(path)
    data, labels = entry.get("data"), entry.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"CIFAR-10: {path}: 'data' is {what}; expected uint8 N×3072 (32×32 RGB planes)")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"CIFAR-10: {path}: {len(labels)} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"CIFAR-10: {path}: label {labels.max() if labels.max() > 9 else labels.min()} "
                        f"is not a CIFAR-10 class (0..9)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(path: Path):
    try:
        import torchvision.datasets as tvd

        log.info("downloading CIFAR-10 into %s with torchvision", path)
        tvd.CIFAR10(root=str(path), train=True, download=True)
    except Exception as e:  # network, permissions, md5: all mean "no data here"
        raise DataError(f"CIFAR-10: torchvision could not download into {path} ({e}); check the "
                        f"internet connection and that shard.path is a writable folder")


def read_cifar10(path: Path, download: bool, limit: int | None) -> SourceData:
    """The train (data_batch_1..5) and test (test_batch) splits of a torchvision-style copy."""
    root = path / LAYOUT
    files = [*TRAIN, *TEST, META[0]]
    if download and not all((root / f).is_file() for f in files):
        _download(path)
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise DataError(f"CIFAR-10: no torchvision copy found under {path} (missing {root / missing[0]}"
                        + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                        + f"). Set shard.path to the folder that holds {LAYOUT}, or set shard.download: "
                          f"true (needs the internet)")
    meta = _load(root / META[0])
    names = meta.get("label_names")
    if not (isinstance(names, list) and len(names) == 10):
        raise DataError(f"CIFAR-10: {root / META[0]} has no list of 10 'label_names'")
    official = all(_md5(root / f) == md5 for f, md5 in [*TRAIN.items(), *TEST.items(), META])
    if not official:
        log.warning("CIFAR-10 under %s: not the official batch files (md5 differ); read as a custom copy, "
                    "so FIDs are not comparable with published CIFAR-10 numbers", root)
    out = SourceData("cifar10", [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names])
    for split, batch_files in SPLIT_FILES.items():
        parts = [_batch(root / f) for f in batch_files]
        images = np.concatenate([p[0] for p in parts])[:limit]
        labels = np.concatenate([p[1] for p in parts])[:limit]
        out.splits[split] = Split(np.ascontiguousarray(images, dtype=np.uint8), labels)
    return out
