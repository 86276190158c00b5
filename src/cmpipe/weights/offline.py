"""What every offline weights source shares (docs/design.md §5): the cache folder, data files of
packages installed but never imported, the error that says what to install, atomic downloads.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cmpipe.errors import MissingAssetError  # noqa: F401

T = TypeVar("T")


def cache_dir() -> Path:
    """Where converted weights live: $CMPIPE_CACHE, else ~/.cache/cmpipe."""
    env = os.environ.get("CMPIPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cmpipe"


def package_file(package: str, *parts: str) -> Path | None:
    """The file `parts` inside the installed package `package`, or None.

    Found through the import system without importing the package: the weights packages are
    installed with --no-deps, and their ``__init__`` imports what that leaves out (OpenCV, jax).
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc, *parts)
        if path.is_file():
            return path
    return None


def publish(dst: str | Path, make: Callable[[Path], str | Path], *, prefix: str,
            mode: int | None = None) -> Path:
    """Make a file in a private temp folder beside `dst`, then rename it onto `dst`.

    make(folder) writes the file inside folder and returns its path; `mode` is set on it before
    the rename (the folder is private, mkdtemp's 0700). The rename is atomic, so a killed run
    never leaves a half-written file under the final name, and the folder is always removed.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=dst.parent) as tmp:
        made = Path(make(Path(tmp)))
        if mode is not None:
            os.chmod(made, mode)
        os.replace(made, dst)
    return dst


def download_or_fail(allowed: bool, who: str, fetch: Callable[[], T],
                     fail: Callable[[str], Exception]) -> T:
    """fetch() when downloads are `allowed`; else raise fail(reason), the reason in words.

    An OSError from fetch (URLError is one: offline, DNS failure, HTTP error) is a reason too.
    """
    reason = "downloading was not allowed"
    if allowed:
        try:
            return fetch()
        except OSError as e:
            reason = f"{who}'s download failed ({e})"
    raise fail(reason)
