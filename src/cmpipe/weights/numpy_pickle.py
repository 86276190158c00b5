"""An unpickler for pickles of (nested dicts of) numpy arrays that can rebuild nothing else."""
from __future__ import annotations

import pickle
from collections.abc import Mapping

import numpy as np


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and nothing else.

    ``find_class`` is how a pickle reaches any callable (os.system included); only the
    three that rebuild an ndarray are granted. The ckpts name ``numpy.core.multiarray``,
    which numpy 2 keeps only as a deprecated alias: it is answered with the real function.
    """

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        if module == "collections":
            import collections

            return collections.OrderedDict
        return getattr(np, name)


def flatten_float32(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict of float32 arrays as {"outer/inner/name": array}; anything else is refused."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_float32(value, path + "/"))
        elif isinstance(value, np.ndarray) and value.dtype == np.float32:
            flat[path] = value
        else:
            raise pickle.UnpicklingError(f"{path}: expected a float32 array, got {type(value).__name__}")
    return flat
