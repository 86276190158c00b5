"""Seeded randomness: independent generator streams named by integers (seed, index, ...)."""
from __future__ import annotations

import hashlib
import json

import torch


def seeded_generator(*parts: int, device="cpu") -> torch.Generator:
    """A generator whose seed is a hash of integers (seed, step, ...): independent streams."""
    h = hashlib.sha256(json.dumps(list(map(int, parts))).encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
    return g


def per_sample_randn(seed: int, indices, shape, *stream: int) -> torch.Tensor:
    """Standard normal noise of `shape` for each global sample index, from (seed, index, *stream)."""
    return torch.stack([torch.randn(shape, generator=seeded_generator(seed, int(i), *stream))
                        for i in indices])
