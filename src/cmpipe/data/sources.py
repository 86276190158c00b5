"""Dataset readers: every source becomes uint8 images N×H×W×C plus int64 labels, per split.

Sources (``shard.source`` in params.yaml):

- ``fashion_mnist``: the gzip idx files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), read here directly: their gzip bytes differ from
  torchvision's, so torchvision's md5 check would reject them. ``download: true`` falls back to
  torchvision's downloader (needs the internet).
- ``mnist``, ``cifar10``: a torchvision-style copy under ``path`` (``path/MNIST/raw/...``,
  ``path/cifar-10-batches-py/...``), or a torchvision download.
- ``image_folder``: ``path/<class>/**/*.png|jpg|jpeg`` is one split ``train``; a folder with
  ``train/`` and ``test/`` subfolders holds one split per subfolder, each laid out by class.
- ``npz``: arrays ``images`` (N×H×W or N×H×W×C, uint8), optional ``labels`` and
  ``class_names``; one split ``train``.

Every reader fails with a `DataError` that names the missing or bad input and says how to fix it.
`load_source` is what the shard stage calls: read, keep the first ``limit`` images of each split,
and convert to the requested resolution and channels.
"""
from __future__ import annotations

import gzip
import logging
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

SOURCES = ("fashion_mnist", "mnist", "cifar10", "image_folder", "npz")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# split name -> file prefix of the idx files (the test split is called t10k on disk)
FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

APT_HINT = "sudo apt-get install dataset-fashion-mnist"


class DataError(ValueError):
    """A source dataset is missing, unreadable or malformed (the message names it and the fix)."""


@dataclass
class Split:
    images: np.ndarray  # uint8, N×H×W×C
    labels: np.ndarray  # int64, N

    def __post_init__(self):
        assert self.images.dtype == np.uint8 and self.images.ndim == 4, self.images.shape
        assert self.labels.dtype == np.int64 and self.labels.shape == (len(self.images),)


@dataclass
class SourceData:
    name: str
    class_names: list[str]
    splits: dict[str, Split] = field(default_factory=dict)


# ----------------------------------------------------------------------------- transforms

def _check_target(resolution: int, resize_mode: str, channels: int):
    if resize_mode not in ("resize", "pad"):
        raise DataError(f"resize_mode {resize_mode!r} must be 'resize' or 'pad'")
    if channels not in (1, 3):
        raise DataError(f"channels {channels!r} must be 1 or 3")
    if resolution < 1:
        raise DataError(f"resolution {resolution!r} must be positive")


def _pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def _to_channels_pil(im: Image.Image, channels: int) -> Image.Image:
    # 'L' is PIL's ITU-R 601-2 luma; gray -> RGB repeats the channel.
    return im.convert("L" if channels == 1 else "RGB")


def _resize_pil(im: Image.Image, resolution: int) -> Image.Image:
    w, h = im.size
    if w != h:
        # A non-square image is centre-cropped to its largest square first, so `resize` never
        # changes the aspect ratio of what is drawn (the usual preparation of image datasets).
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if im.size != (resolution, resolution):
        im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return im


def _pad_array(images: np.ndarray, resolution: int, what: str) -> np.ndarray:
    """Centre zero padding of N×H×W×C to N×R×R×C (the extra pixel of an odd margin goes last)."""
    _, h, w, _ = images.shape
    if h > resolution or w > resolution:
        raise DataError(f"{what}: an image of {h}×{w} pixels does not fit resolution {resolution} "
                        f"with resize_mode: pad (padding never shrinks); set shard.resize_mode: resize "
                        f"or shard.resolution >= {max(h, w)}")
    if h == resolution and w == resolution:
        return images
    top, left = (resolution - h) // 2, (resolution - w) // 2
    return np.pad(images, ((0, 0), (top, resolution - h - top), (left, resolution - w - left), (0, 0)))


def transform_images(images: np.ndarray, resolution: int, resize_mode: str, channels: int,
                     what: str = "images") -> np.ndarray:
    """uint8 N×H×W×C -> uint8 N×R×R×channels (resize: bicubic; pad: centre, zero padding)."""
    _check_target(resolution, resize_mode, channels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{what}: expected uint8 N×H×W×C with C = 1 or 3, got {images.dtype} "
                        f"{tuple(images.shape)}")
    n, h, w, c = images.shape
    if resize_mode == "pad":
        images = _pad_array(images, resolution, what)
    elif (h, w) != (resolution, resolution):
        out = np.empty((n, resolution, resolution, c), np.uint8)
        for i, img in enumerate(images):
            im = _resize_pil(_pil(img), resolution)
            out[i] = np.asarray(im).reshape(resolution, resolution, c)
        images = out
    if images.shape[-1] == channels:
        return np.ascontiguousarray(images)
    if channels == 3:  # gray -> RGB: repeat the channel
        return np.ascontiguousarray(np.repeat(images, 3, axis=-1))
    out = np.empty(images.shape[:3] + (1,), np.uint8)
    for i, img in enumerate(images):  # RGB -> gray through PIL's 'L' (same luma as elsewhere)
        out[i, ..., 0] = np.asarray(_pil(img).convert("L"))
    return out


def transform_image_file(im: Image.Image, resolution: int, resize_mode: str, channels: int,
                         what: str) -> np.ndarray:
    """One decoded PIL image (any mode, any size) -> uint8 R×R×channels."""
    im = _to_channels_pil(im, channels)
    if resize_mode == "resize":
        arr = np.asarray(_resize_pil(im, resolution))
        return arr.reshape(resolution, resolution, channels)
    arr = np.asarray(im).reshape(im.size[1], im.size[0], channels)
    return _pad_array(arr[None], resolution, what)[0]


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
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "CIFAR-10"),
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


# ----------------------------------------------------------------------------- image folder

def _visible(p: Path) -> bool:
    # Hidden entries (.DS_Store, .ipynb_checkpoints, .gitkeep) are tooling debris, not data.
    return not p.name.startswith(".")


def _subdirs(d: Path) -> list[Path]:
    return sorted((p for p in d.iterdir() if _visible(p) and p.is_dir()), key=lambda p: p.name)


def _image_folder_splits(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder; set shard.path to a "
                        f"folder of class subfolders holding PNG/JPEG images")
    subs = _subdirs(root)
    names = {p.name for p in subs}
    if {"train", "test"} <= names:
        # A split layout: every subfolder is a split (train, test, and e.g. val), each by class.
        for p in sorted(root.iterdir()):
            if _visible(p) and not p.is_dir():
                raise DataError(f"{p}: a file next to the split folders of {root}; move it into "
                                f"a class folder of a split (e.g. {root / 'train' / '<class>'})")
        return {p.name: p for p in subs}
    return {"train": root}


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    """class name -> sorted image files (any depth) under split_dir/<class>/."""
    for p in sorted(split_dir.iterdir()):
        if _visible(p) and not p.is_dir():
            raise DataError(f"{p}: images must sit in class subfolders of {split_dir} "
                            f"(e.g. {split_dir / '<class>' / p.name}); the subfolder name is the label")
    out = {}
    for cdir in _subdirs(split_dir):
        files = []
        # Sorted walk (dirs and files) so the image order, and so the shards, never depend on
        # the file system's listing order.
        for dirpath, dirnames, filenames in os.walk(cdir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                f = Path(dirpath) / name
                if f.suffix.lower() not in IMAGE_EXTENSIONS:
                    raise DataError(f"{f}: not a PNG/JPEG image (extension {f.suffix or 'none'}); "
                                    f"remove it from the image folder {split_dir}")
                files.append(f)
        out[cdir.name] = files
    return out


def _read_image_file(f: Path, resolution: int, resize_mode: str, channels: int) -> np.ndarray:
    try:
        with Image.open(f) as im:
            im.load()
            return transform_image_file(im, resolution, resize_mode, channels, what=str(f))
    except DataError:
        raise
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError)
        raise DataError(f"{f}: unreadable image ({type(e).__name__}: {e}); replace or remove the file")


def _read_image_folder(path: Path, limit: int | None, resolution: int, resize_mode: str,
                       channels: int) -> SourceData:
    split_dirs = _image_folder_splits(path)
    per_split = {s: _class_files(d) for s, d in split_dirs.items()}
    # One label space for all splits: the sorted union of class folder names.
    class_names = sorted(set().union(*(set(c) for c in per_split.values())))
    if not class_names:
        raise DataError(f"image folder {path} is empty: no class subfolders with PNG/JPEG images; "
                        f"lay it out as {path / '<class>' / '<image>.png'}")
    out = SourceData("image_folder", class_names)
    for split, classes in per_split.items():
        items = [(f, class_names.index(c)) for c in sorted(classes) for f in classes[c]]
        for c, files in classes.items():
            if not files:
                log.warning("class folder %s holds no images", split_dirs[split] / c)
        if not items:
            raise DataError(f"image folder {split_dirs[split]} (split {split}) is empty: no PNG/JPEG "
                            f"images in its class subfolders")
        items = items[:limit]
        images = np.empty((len(items), resolution, resolution, channels), np.uint8)
        for i, (f, _) in enumerate(items):
            images[i] = _read_image_file(f, resolution, resize_mode, channels)
        labels = np.array([y for _, y in items], np.int64)
        out.splits[split] = Split(images, labels)
    return out


# ----------------------------------------------------------------------------- npz

def _read_npz(path: Path, limit: int | None) -> SourceData:
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist; set shard.path to an .npz file holding an "
                        f"'images' array (N×H×W or N×H×W×C, uint8)")
    try:
        z = np.load(path, allow_pickle=False)  # never unpickle: a crafted file could run code
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: cannot read it as .npz ({e}); write it with np.savez(path, images=...)")
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single .npy array, not an .npz archive; write it with "
                        f"np.savez(path, images=..., labels=...)")
    with z:
        if "images" not in z.files:
            raise DataError(f"{path}: no array named 'images' (arrays: {', '.join(z.files) or 'none'}); "
                            f"write it with np.savez(path, images=..., labels=...)")
        try:
            images = z["images"]
            labels = z["labels"] if "labels" in z.files else None
            names = z["class_names"] if "class_names" in z.files else None
        except ValueError as e:  # object arrays refuse to load without pickle
            raise DataError(f"{path}: {e} (object arrays are refused: store plain numeric arrays)")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: 'images' has dtype {images.dtype}; expected uint8 in 0..255 "
                        f"(convert with np.clip(x * 255, 0, 255).round().astype(np.uint8))")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or 0 in images.shape:
        raise DataError(f"{path}: 'images' has shape {tuple(images.shape)}; expected N×H×W (gray) "
                        f"or N×H×W×C with C = 1 or 3 and N, H, W > 0")
    n = len(images)
    if labels is None:
        labels = np.zeros(n, np.int64)
    else:
        if labels.ndim != 1 or len(labels) != n or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: 'labels' must be a 1-D integer array of length {n} (one per "
                            f"image); got {labels.dtype} {tuple(labels.shape)}")
        if labels.min() < 0:
            raise DataError(f"{path}: 'labels' holds a negative value ({labels.min()})")
        labels = labels.astype(np.int64)
    n_classes = int(labels.max()) + 1
    if names is None:
        class_names = [str(i) for i in range(n_classes)]
    else:
        if names.ndim != 1 or names.dtype.kind not in "US" or len(names) < n_classes:
            raise DataError(f"{path}: 'class_names' must be a 1-D string array with at least "
                            f"{n_classes} names (labels go up to {n_classes - 1}); got {names.dtype} "
                            f"{tuple(names.shape)}")
        class_names = [str(s) for s in names.tolist()]
    out = SourceData("npz", class_names)
    out.splits["train"] = Split(np.ascontiguousarray(images[:limit]), labels[:limit])
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
                channels: int | None = None) -> SourceData:
    """Read a source's splits, keeping the first `limit` images of each.

    Array sources (fashion_mnist, mnist, cifar10, npz) return their native size; `image_folder`
    needs `resolution` and `channels` because its files differ in size and mode (each one is
    converted as it is read).
    """
    path = Path(path)
    if source == "fashion_mnist":
        return _read_fashion_mnist(path, download, limit)
    if source in _TV:
        return _read_torchvision(source, path, download, limit)
    if source == "image_folder":
        if resolution is None or channels is None:
            raise DataError("image_folder needs resolution and channels (its images differ in size)")
        _check_target(resolution, resize_mode, channels)
        return _read_image_folder(path, limit, resolution, resize_mode, channels)
    if source == "npz":
        return _read_npz(path, limit)
    raise DataError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")


def load_source(source: str, path: str | Path, *, resolution: int, resize_mode: str = "resize",
                channels: int = 1, download: bool = False, limit: int | None = None) -> SourceData:
    """Read a source and convert every split to uint8 N×resolution×resolution×channels."""
    data = read_source(source, path, download=download, limit=limit, resolution=resolution,
                       resize_mode=resize_mode, channels=channels)
    for name, split in data.splits.items():
        images = transform_images(split.images, resolution, resize_mode, channels,
                                  what=f"{source} {path} split {name}")
        data.splits[name] = Split(images, split.labels)
    return data


def load_source_from_params(p: Any) -> SourceData:
    """`load_source` driven by the validated `shard` section of params.yaml."""
    return load_source(p.source, p.path, resolution=p.resolution, resize_mode=p.resize_mode,
                       channels=p.channels, download=p.download, limit=p.limit)


def check_roles(train_split: str, ref_split: str, available: list[str]) -> None:
    """Both roles of the shard params must name splits the source has."""
    for key, split in (("shard.train_split", train_split), ("shard.ref_split", ref_split)):
        if split not in available:
            raise DataError(f"params.yaml: {key} = {split!r} is not a split of this source "
                            f"(available: {', '.join(available)}); set {key} to one of them")
