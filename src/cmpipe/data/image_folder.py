"""The ``image_folder`` source: ``path/<class>/**/*.png|jpg|jpeg`` is split ``train``; a folder
with ``train/`` and ``test/`` subfolders holds one split per subfolder, each laid out by class."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cmpipe.data.base import DataError, SourceData, Split
from cmpipe.data.transforms import transform_image_file

log = logging.getLogger(__name__)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


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


def _read_image_file(f: Path, resolution: int, resize_mode: str, channels: int,
                     alpha_background: str = "white") -> np.ndarray:
    try:
        with Image.open(f) as im:
            im.load()
            return transform_image_file(im, resolution, resize_mode, channels, what=str(f),
                                        alpha_background=alpha_background)
    except DataError:
        raise
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError)
        raise DataError(f"{f}: unreadable image ({type(e).__name__}: {e}); replace or remove the file")


def _read_image_folder(path: Path, limit: int | None, resolution: int, resize_mode: str,
                       channels: int, alpha_background: str = "white") -> SourceData:
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
            images[i] = _read_image_file(f, resolution, resize_mode, channels, alpha_background)
        labels = np.array([y for _, y in items], np.int64)
        out.splits[split] = Split(images, labels)
    return out
