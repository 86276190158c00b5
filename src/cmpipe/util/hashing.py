"""Content hashes of files, bytes, tensors and settings."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch


def fingerprint_of(*parts) -> str:
    """A short hash of params and input hashes that decides whether a checkpoint may be resumed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: str | Path, expected: str, record: str | Path, fix: str,
                 error: type[Exception] = ValueError) -> Path:
    """`path` if its sha256 is the one `record` holds for it; else error(message naming both and `fix`).

    A cache or shard is read only as it was written: an edited file would train silently.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}, listed in {record}, is missing: {fix}")
    digest = sha256_file(path)
    if digest != expected:
        raise error(f"{path}: sha256 {digest} differs from {expected} recorded in {record}; the file "
                    f"changed after it was written: {fix}")
    return path


def sha1_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's content: names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
