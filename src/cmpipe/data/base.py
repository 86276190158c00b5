"""Types shared across cmpipe.data: its two error classes and a source's in-memory splits."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cmpipe.errors import DataError, ShardError  # noqa: F401 (cmpipe.data's errors)


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
