"""Atomic writes: a crash or a kill never leaves a half-written output behind."""
from __future__ import annotations

import errno
import json
import os
import shutil
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


def temp_dir_beside(target) -> Path:
    """A new empty folder beside `target` (same file system, so a rename can replace it), with the
    mode a plain mkdir would give (mkdtemp makes 0700)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def replace_dir(src, dst) -> Path:
    """Rename the finished folder `src` to `dst`, replacing an old `dst` by renames only: `dst` is
    the old folder or the whole new one, never a mix; if the second rename fails the old is put back."""
    src, dst = Path(src), Path(dst)
    if not (dst.exists() or dst.is_symlink()):
        os.replace(src, dst)
        return dst
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, old / dst.name)
    try:
        os.replace(src, dst)
    except OSError:
        os.replace(old / dst.name, dst)
        raise
    finally:
        if dst.exists():
            shutil.rmtree(old, ignore_errors=True)
    return dst


@contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside `path`; on success it replaces `path` (`replace_dir`), on any
    error it is removed and `path` is left as it was."""
    tmp = temp_dir_beside(path)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
