"""The ``npz`` source: arrays ``images`` (N×H×W or N×H×W×C, uint8), optional ``labels`` and
``class_names``, read without unpickling; one split ``train``."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from cmpipe.data.base import DataError, SourceData, Split


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
