"""Nested dicts of float32 arrays from a pickle read by the restricted unpickler."""
from __future__ import annotations

import pickle
from collections.abc import Mapping

import numpy as np



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
