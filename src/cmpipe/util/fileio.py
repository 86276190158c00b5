"""Atomic writes: a crash or a kill never leaves a half-written output behind."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it replaces `path`, on any error it is
    removed and `path` is left as it was. A full disk is reported as such, naming the file."""
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"no space left on the disk while writing {path}; nothing was "
                                   f"replaced (the previous file, if any, is intact): free space under "
                                   f"{path.parent} and run the stage again") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_savez(path, **arrays) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def atomic_save(obj, path: Path):
    """torch.save through a temporary file: a kill or a full disk mid-write leaves the previous
    checkpoint usable and no partial file."""
    from cmpipe.util.fileio import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # Through a file object: given a path, torch.save names the archive inside the file
        # after it, and the temporary name would make equal checkpoints differ byte-wise.
        torch.save(obj, f)
