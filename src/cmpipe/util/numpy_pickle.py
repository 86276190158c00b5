"""An unpickler for pickles of dicts, lists and numpy arrays that can rebuild nothing else.

``pickle.Unpickler.find_class`` is how a pickle reaches any callable (os.system included). This
one grants only what rebuilds an ndarray (protocols 2 to 5), an OrderedDict, and the latin-1
``_codecs.encode`` that a protocol-2 pickle of bytes uses. Files name ``numpy.core.*``, which
numpy 2 keeps only as a deprecated alias: they get the real functions. Readers of the LPIPS
checkpoints (:mod:`cmpipe.weights.lpips`) and of CIFAR-10 batches (:mod:`cmpipe.data.cifar10`)
share it.
"""
from __future__ import annotations

import collections
import pickle

import numpy as np


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _frombuffer(buf, dtype, shape, order):
    """numpy's pickle protocol 5 rebuilder of a contiguous array (numpy._core.numeric._frombuffer)."""
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """The only use of _codecs.encode a protocol-2 pickle of bytes makes (Python 3's b"data" keys)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class NumpyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, bytes, numbers and numpy arrays; refuses every other global."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("collections", "OrderedDict"), ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        if name == "_reconstruct":
            return _reconstruct()
        if name == "_frombuffer":
            return _frombuffer
        if module == "_codecs":
            return _latin1_bytes
        if module == "collections":
            return collections.OrderedDict
        return getattr(np, name)
