"""Source datasets: every source becomes uint8 images N×H×W×C plus int64 labels, per split.

`load_source` is what the shard stage calls. The readers of the array datasets live here, the
others in image_folder.py and npz.py; each fails with a `DataError` naming the input and the fix.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from cmpipe.data.base import DataError, SourceData, Split
from cmpipe.data.cifar10 import read_cifar10
from cmpipe.data.image_folder import _image_folder_splits, _read_image_folder
from cmpipe.data.npz import _read_npz
from cmpipe.data.transforms import _check_target, transform_images

log = logging.getLogger(__name__)


# shard.source in params.yaml:
# - fashion_mnist: the gzip idx files of the Debian package dataset-fashion-mnist
#   (/usr/share/datasets/fashion-mnist), read here directly: their gzip bytes differ from
#   torchvision's, so torchvision's md5 check would reject them. `download: true` falls back to
#   torchvision's downloader (needs the internet).
# - mnist: a torchvision-style copy under `path` (path/MNIST/raw/...), or a torchvision download.
# - cifar10: a torchvision-style copy (path/cifar-10-batches-py/...), read by cifar10.py (any
#   copy in that layout, not only the official files), or a torchvision download.
# - image_folder (image_folder.py), npz (npz.py).
SOURCES = ("fashion_mnist", "mnist", "cifar10", "image_folder", "npz")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# split name -> file prefix of the idx files (the test split is called t10k on disk)
FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}

APT_HINT = "sudo apt-get install dataset-fashion-mnist"


# ----------------------------------------------------------------------------- idx (Fashion-MNIST)

IDX_UBYTE = 0x08


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an idx file (gzip or not) of unsigned bytes: magic 0x0000 08 <ndim>, big-endian dims.

    Images have ndim 3 (magic 2051, 16-byte header), labels ndim 1 (magic 2049, 8-byte header).
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read the idx file ({e}); reinstall it with {APT_HINT}")
    header = 4 + 4 * ndim
    expected_magic = (IDX_UBYTE << 8) | ndim
    if len(data) < header:
        raise DataError(f"{path}: {len(data)} bytes is shorter than an idx header ({header} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: idx magic number {magic} (0x{magic:08x}), expected {expected_magic} "
                        f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''}); is this the right file?")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims))
    if len(data) != header + size:
        raise DataError(f"{path}: the header says {dims} ({size} bytes of data) but the file holds "
                        f"{len(data) - header}: truncated or corrupt; reinstall it with {APT_HINT}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    # The Debian package's layout is root/<stem>.gz; torchvision's download leaves
    # root/FashionMNIST/raw/<stem>(.gz).
    for d in (root, root / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def _fashion_mnist_files(root: Path) -> tuple[dict, list[Path]]:
    files, missing = {}, []
    for split, prefix in FASHION_MNIST_FILES.items():
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            found = _find_idx(root, f"{prefix}-{kind}")
            if found is None:
                missing.append(root / f"{prefix}-{kind}.gz")
            files[split, kind] = found
    return files, missing


def _read_fashion_mnist(path: Path, download: bool, limit: int | None) -> SourceData:
    files, missing = _fashion_mnist_files(path)
    if missing and download:
        try:
            import torchvision.datasets as tvd

            log.info("downloading Fashion-MNIST into %s with torchvision", path)
            # Its download() fetches all four files; they land in path/FashionMNIST/raw.
            tvd.FashionMNIST(root=str(path), train=True, download=True)
        except Exception as e:  # network, permissions, md5: all mean "no data here"
            raise DataError(f"Fashion-MNIST: torchvision could not download into {path} ({e}); "
                            f"check the internet connection and that shard.path is a writable folder, "
                            f"or install the files offline with {APT_HINT} and set shard.download: false")
        files, missing = _fashion_mnist_files(path)
    if missing:
        raise DataError(f"Fashion-MNIST: {missing[0]} is missing"
                        + (f" (and {len(missing) - 1} more idx files)" if len(missing) > 1 else "")
                        + f". Install the Debian package ({APT_HINT}), point shard.path at a folder "
                        f"holding the {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz files, "
                        f"or set shard.download: true (torchvision download, needs the internet)")
    out = SourceData("fashion_mnist", list(FASHION_MNIST_CLASSES))
    for split in FASHION_MNIST_FILES:
        images = read_idx(files[split, "images-idx3-ubyte"], 3)
        labels = read_idx(files[split, "labels-idx1-ubyte"], 1)
        if len(images) != len(labels):
            raise DataError(f"Fashion-MNIST {split}: {files[split, 'images-idx3-ubyte']} holds "
                            f"{len(images)} images but {files[split, 'labels-idx1-ubyte']} "
                            f"{len(labels)} labels; reinstall with {APT_HINT}")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{files[split, 'labels-idx1-ubyte']}: label {labels.max()} is not a "
                            f"Fashion-MNIST class (0..9)")
        images, labels = images[:limit], labels[:limit]
        out.splits[split] = Split(np.ascontiguousarray(images[..., None]), labels.astype(np.int64))
    return out


# ----------------------------------------------------------------------------- torchvision copies

_TV = {
    # source: (torchvision class, folder torchvision expects under root, human name)
    "mnist": ("MNIST", "MNIST/raw", "MNIST"),
}


def _read_torchvision(source: str, path: Path, download: bool, limit: int | None) -> SourceData:
    cls_name, layout, what = _TV[source]
    if not download and not (path / layout).is_dir():
        # Fail before importing torchvision (seconds): the folder it would read is not there.
        raise DataError(f"{what}: no torchvision copy found under {path} (expected the folder "
                        f"{path / layout}). Set shard.path to the folder that holds {layout}, "
                        f"or set shard.download: true (needs the internet)")
    try:
        import torchvision.datasets as tvd
    except ImportError as e:  # pragma: no cover - torchvision is a dependency
        raise DataError(f"{what}: torchvision is needed to read shard.source {source} ({e})")
    cls = getattr(tvd, cls_name)
    out = None
    for split in ("train", "test"):
        try:
            ds = cls(root=str(path), train=(split == "train"), download=download)
        except Exception as e:
            if download:
                raise DataError(f"{what}: torchvision could not download into {path} ({e}); check the "
                                f"internet connection and that shard.path is a writable folder")
            raise DataError(f"{what}: no torchvision copy found under {path} (expected "
                            f"{path / layout}; torchvision says: {e}). Set shard.path to the folder that "
                            f"holds {layout}, or set shard.download: true (needs the internet)")
        data = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
        targets = np.asarray(ds.targets.numpy() if hasattr(ds.targets, "numpy") else ds.targets)
        if data.ndim == 3:
            data = data[..., None]
        if out is None:
            out = SourceData(source, [str(c) for c in ds.classes])
        out.splits[split] = Split(np.ascontiguousarray(data[:limit], dtype=np.uint8),
                                  targets[:limit].astype(np.int64))
    return out


# ----------------------------------------------------------------------------- entry points

def list_splits(source: str, path: str | Path) -> list[str]:
    """The split names a source offers, found without reading any image (to check roles early)."""
    if source in ("fashion_mnist", "mnist", "cifar10"):
        return ["train", "test"]
    if source == "npz":
        return ["train"]
    if source == "image_folder":
        return list(_image_folder_splits(Path(path)))
    raise DataError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")


def read_source(source: str, path: str | Path, *, download: bool = False, limit: int | None = None,
                resolution: int | None = None, resize_mode: str = "resize",
                channels: int | None = None, alpha_background: str = "white") -> SourceData:
    """Read a source's splits, keeping the first `limit` images of each.

    Array sources (fashion_mnist, mnist, cifar10, npz) return their native size; `image_folder`
    needs `resolution` and `channels` because its files differ in size and mode (each one is
    converted as it is read).
    """
    path = Path(path)
    if source == "fashion_mnist":
        return _read_fashion_mnist(path, download, limit)
    if source == "cifar10":
        return read_cifar10(path, download, limit)
    if source in _TV:
        return _read_torchvision(source, path, download, limit)
    if source == "image_folder":
        if resolution is None or channels is None:
            raise DataError("image_folder needs resolution and channels (its images differ in size)")
        _check_target(resolution, resize_mode, channels)
        return _read_image_folder(path, limit, resolution, resize_mode, channels, alpha_background)
    if source == "npz":
        return _read_npz(path, limit)
    raise DataError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")


def load_source(source: str, path: str | Path, *, resolution: int, resize_mode: str = "resize",
                channels: int = 1, download: bool = False, limit: int | None = None,
                alpha_background: str = "white") -> SourceData:
    """Read a source and convert every split to uint8 N×resolution×resolution×channels."""
    data = read_source(source, path, download=download, limit=limit, resolution=resolution,
                       resize_mode=resize_mode, channels=channels, alpha_background=alpha_background)
    for name, split in data.splits.items():
        images = transform_images(split.images, resolution, resize_mode, channels,
                                  what=f"{source} {path} split {name}")
        data.splits[name] = Split(images, split.labels)
    return data


HOLDOUT = "holdout"  # the split shard.holdout carves out of the train split


def holdout_count(holdout: float, n: int, what: str) -> int:
    """Images to hold out of n: a fraction (0 < holdout < 1, rounded) or a count (holdout >= 1)."""
    if holdout <= 0:
        return 0
    if holdout >= 1 and holdout != int(holdout):
        raise DataError(f"params.yaml: shard.holdout = {holdout} is neither a fraction below 1 nor a "
                        f"whole count of images; set e.g. 0.1 or 1000")
    k = round(holdout * n) if holdout < 1 else int(holdout)
    if not 1 <= k < n:
        raise DataError(f"params.yaml: shard.holdout = {holdout} holds out {k} of the {n} images of "
                        f"{what}; at least one image must be held out and one left to train on")
    return k


def hold_out(data: SourceData, holdout: float, split: str = "train") -> SourceData:
    """Move `holdout` of `split`'s images into a new split `holdout`, chosen by content.

    The held-out images are those whose bytes (with the label) have the smallest sha256: the
    choice needs no seed, does not depend on the file order, keeps every other image where it
    was when images are added, and puts duplicates on the same side.
    """
    if holdout <= 0:
        return data
    if HOLDOUT in data.splits:
        raise DataError(f"{data.name}: the source already has a split named {HOLDOUT!r}; set "
                        f"shard.holdout: 0 and shard.ref_split: {HOLDOUT}")
    if split not in data.splits:
        raise DataError(f"params.yaml: shard.train_split = {split!r} is not a split of this source "
                        f"(available: {', '.join(data.splits)}); set it to one of them")
    s = data.splits[split]
    k = holdout_count(holdout, len(s.images), f"split {split}")
    keys = [hashlib.sha256(img.tobytes() + int(y).to_bytes(8, "little")).digest()
            for img, y in zip(s.images, s.labels)]
    order = sorted(range(len(keys)), key=lambda i: (keys[i], i))
    held = np.zeros(len(keys), bool)
    held[order[:k]] = True
    data.splits[split] = Split(np.ascontiguousarray(s.images[~held]), s.labels[~held])
    data.splits[HOLDOUT] = Split(np.ascontiguousarray(s.images[held]), s.labels[held])
    return data


def load_source_from_params(p: Any) -> SourceData:
    """`load_source` driven by the validated `shard` section of params.yaml."""
    data = load_source(p.source, p.path, resolution=p.resolution, resize_mode=p.resize_mode,
                       channels=p.channels, download=p.download, limit=p.limit,
                       alpha_background=p.alpha_background)
    return hold_out(data, p.holdout, p.train_split)


def check_roles(train_split: str, ref_split: str, available: list[str], holdout: float = 0) -> None:
    """Both roles of the shard params must name splits the source has (with `holdout`, also
    the split it makes); the reference must not be the training split."""
    if holdout > 0:
        available = [*available, HOLDOUT]
    for key, split in (("shard.train_split", train_split), ("shard.ref_split", ref_split)):
        if split not in available:
            hint = (f"; or hold out images of a single-split source: shard.holdout: 0.1 and "
                    f"shard.ref_split: {HOLDOUT}" if key == "shard.ref_split" and holdout <= 0 else "")
            raise DataError(f"params.yaml: {key} = {split!r} is not a split of this source "
                            f"(available: {', '.join(available)}); set {key} to one of them{hint}")
    if holdout > 0 and train_split == HOLDOUT:
        raise DataError(f"params.yaml: shard.train_split = {HOLDOUT!r} would train on the held-out "
                        f"images; set it to the split they are taken from")
    if train_split == ref_split:
        log.warning("shard.ref_split = shard.train_split = %r: the FID reference and the edit stage's "
                    "images are training images; set shard.holdout (e.g. 0.1) and shard.ref_split: %s "
                    "for images the models never trained on", ref_split, HOLDOUT)
