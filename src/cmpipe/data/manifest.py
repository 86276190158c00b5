"""The shard manifest (``manifest.json`` beside the split folders): `write_dataset` shards a
whole source and writes it; `read_manifest`, `shard_paths` and `load_image_split` read it back."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from cmpipe.data.base import ShardError
from cmpipe.data.png import decode_pngs
from cmpipe.data.shards import _iter_raw_samples, describe_shard, write_shards
from cmpipe.util.fileio import atomic_dir
from cmpipe.util.hashing import check_sha256, sha256_file

log = logging.getLogger(__name__)


# The manifest, beside the split folders; shard paths are relative to the repository root:
#   {"source": "fashion_mnist", "resolution": 28, "channels": 1, "shape": [1, 28, 28],
#    "class_names": [...], "roles": {"train": "train", "ref": "test"},
#    "splits": {"train": {"count": 60000, "shards": [
#        {"path": "data/shards/train/shard-000000.tar", "sha256": "...", "count": 10000}, ...]}}}
MANIFEST = "manifest.json"


def _manifest_error(path: Path, what: str) -> ShardError:
    return ShardError(f"manifest {path}: {what}; re-create it with `dvc repro shard`")


def read_manifest(path: str | Path) -> dict:
    """Load and check a shard manifest (structure, shape, counts)."""
    path = Path(path)
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise ShardError(f"manifest {path} not found; run `dvc repro shard` (or `dvc pull`) first")
    except (OSError, ValueError) as e:
        raise _manifest_error(path, f"unreadable ({e})")
    if not isinstance(m, dict):
        raise _manifest_error(path, "not a JSON object")
    for k in ("source", "resolution", "channels", "shape", "class_names", "roles", "splits"):
        if k not in m:
            raise _manifest_error(path, f"missing key {k!r}")
    shape = m["shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise _manifest_error(path, f"shape {shape!r} is not [C, H, W]")
    if not isinstance(m["splits"], dict) or not m["splits"]:
        raise _manifest_error(path, "no splits")
    for name, info in m["splits"].items():
        try:
            total = sum(int(s["count"]) for s in info["shards"])
            ok = all(isinstance(s["path"], str) and isinstance(s["sha256"], str) for s in info["shards"])
        except (KeyError, TypeError, ValueError):
            raise _manifest_error(path, f"split {name} is malformed")
        if not ok or total != info.get("count"):
            raise _manifest_error(path, f"split {name}: shard counts add up to {total}, "
                                        f"not the split's count {info.get('count')!r}")
    if not isinstance(m["roles"], dict) or any(v not in m["splits"] for v in m["roles"].values()):
        raise _manifest_error(path, f"roles {m['roles']!r} name splits it does not have")
    return m


def _split_name(manifest: dict, path: Path, split: str | None, role: str | None) -> str:
    if (split is None) == (role is None):
        raise ValueError("give exactly one of split= (a split name) or role= ('train' or 'ref')")
    if role is not None:
        if role not in manifest["roles"]:
            raise ShardError(f"manifest {path}: no role {role!r} (roles: {', '.join(manifest['roles'])})")
        split = manifest["roles"][role]
    if split not in manifest["splits"]:
        raise ShardError(f"manifest {path}: no split {split!r} (splits: {', '.join(manifest['splits'])})")
    return split


def _resolve_shard(manifest_path: Path, rel: str) -> Path:
    # Shard paths are relative to the repository root: look in the folders above the manifest,
    # nearest first, so the loader works from any working directory.
    mdir = manifest_path.resolve().parent
    for root in (mdir, *mdir.parents):
        if (root / rel).is_file():
            return root / rel
    raise ShardError(f"manifest {manifest_path}: shard {rel} not found (looked relative to the "
                     f"folders above the manifest); run `dvc repro shard` or `dvc pull`")


SHARD_FIX = ("restore the shards with `dvc checkout data/shards` or re-create them and the manifest "
             "with `dvc repro -f shard`")


def shard_paths(manifest_path: str | Path, split: str | None = None, role: str | None = None,
                verify: bool = True) -> list[Path]:
    """The shard files of a split (or of the split playing `role`), in order; with `verify`, each
    checked against the manifest's sha256 (the streaming loader reads them without a check)."""
    manifest_path = Path(manifest_path)
    m = read_manifest(manifest_path)
    name = _split_name(m, manifest_path, split, role)
    paths = []
    for s in m["splits"][name]["shards"]:
        path = _resolve_shard(manifest_path, s["path"])
        if verify:
            check_sha256(path, s["sha256"], manifest_path, SHARD_FIX, error=ShardError)
        paths.append(path)
    return paths


_LOAD_BATCH = 4096  # PNGs decoded at once by load_image_split


def load_image_split(manifest_path: str | Path, split: str | None = None, role: str | None = None,
                     limit: int | None = None, verify: bool = True):
    """All images and labels of a split: (uint8 tensor N×C×H×W, int64 tensor N).

    `split` names a split; `role` ('train' or 'ref') picks the split the manifest assigns to it.
    `limit` keeps the first N images (reading only the shards needed). With `verify`, each shard
    read is checked against the manifest's sha256 first. Every image must have the manifest's
    shape; a mismatch names the shard and key.
    """
    import torch

    manifest_path = Path(manifest_path)
    m = read_manifest(manifest_path)
    name = _split_name(m, manifest_path, split, role)
    info = m["splits"][name]
    c, h, w = m["shape"]
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    total = info["count"] if limit is None else min(limit, info["count"])
    images = np.empty((total, c, h, w), np.uint8)
    labels = np.empty(total, np.int64)
    filled = 0
    for entry in info["shards"]:
        if filled >= total:
            break
        path = _resolve_shard(manifest_path, entry["path"])
        if verify:
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                raise ShardError(f"shard {path}: sha256 {digest} differs from the manifest's "
                                 f"{entry['sha256']}; the shard changed after the manifest was written: "
                                 f"{SHARD_FIX}")
        want = min(entry["count"], total - filled)
        got = 0
        keys: list[str] = []
        blobs: list[bytes] = []

        def flush():
            # decode in batches: bounded memory for big images, vectorised speed for small ones
            nonlocal filled
            pix = decode_pngs(blobs, (h, w, c), keys, where=f"shard {path}")
            images[filled:filled + len(blobs)] = pix.transpose(0, 3, 1, 2)
            filled += len(blobs)
            keys.clear()
            blobs.clear()

        # a verified file needs no per-header checksums
        for key, members in _iter_raw_samples(path, check_headers=not verify):
            if got == want:
                if want < entry["count"]:
                    break  # `limit` reached
                raise ShardError(f"shard {path}: holds more samples than the manifest's "
                                 f"{entry['count']}; re-create it with `dvc repro shard`")
            if "png" not in members or "cls" not in members:
                raise ShardError(f"shard {path} key {key}: needs png and cls members, has "
                                 f"{', '.join(sorted(members))}")
            try:
                labels[filled + len(blobs)] = int(members["cls"])
            except ValueError:
                raise ShardError(f"shard {path} key {key}: cls {members['cls'][:20]!r} is not an integer")
            keys.append(key)
            blobs.append(members["png"])
            got += 1
            if len(blobs) == _LOAD_BATCH:
                flush()
        if got < want:
            raise ShardError(f"shard {path}: holds {got} samples, the manifest says "
                             f"{entry['count']}; re-create it with `dvc repro shard`")
        if blobs:
            flush()
    return torch.from_numpy(images), torch.from_numpy(labels)


def write_dataset(data, out_dir: str | Path, images_per_shard: int, roles: dict[str, str],
                  root: str | Path = ".", progress: bool = True) -> dict:
    """Shard every split of a `sources.SourceData` and write the manifest; returns the manifest.

    Layout: ``out_dir/<split>/shard-%06d.tar`` and ``out_dir/manifest.json``, shard paths in the
    manifest relative to `root` (the repository root). Everything is written into a temporary
    folder beside `out_dir`, which then replaces `out_dir` (and any old content) in one rename.
    Records are ``{"__key__": "<split>_000123", "png": image, "cls": label}``.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    for role, split in roles.items():
        if split not in data.splits:
            raise ShardError(f"role {role} names split {split!r}, but the source has only "
                             f"{', '.join(data.splits)}")
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir())
                                                        or (out_dir / MANIFEST).is_file())):
        raise ShardError(f"{out_dir} exists and is not a shard folder (no {MANIFEST}); refusing to "
                         f"replace it: remove it or choose another folder")
    shapes = {s.images.shape[1:] for s in data.splits.values()}
    if len(shapes) != 1:
        raise ShardError(f"splits differ in image shape {sorted(shapes)}; convert them to one size")
    h, w, c = shapes.pop()
    root_abs = Path(root).resolve()
    final_abs = out_dir.resolve()
    with atomic_dir(out_dir) as tmp:
        splits = {}
        for name, split in data.splits.items():
            n = len(split.images)
            width = max(6, len(str(n - 1)))
            records = ({"__key__": f"{name}_{i:0{width}d}", "png": split.images[i],
                        "cls": int(split.labels[i])} for i in range(n))
            bar = tqdm(records, total=n, desc=f"shard {name}", unit="img", disable=not progress,
                       mininterval=1.0)
            paths = write_shards(tmp / name, bar, images_per_shard)
            entries = []
            for p in paths:
                digest, count = describe_shard(p)
                rel = Path(os.path.relpath(final_abs / name / p.name, root_abs)).as_posix()
                entries.append({"path": rel, "sha256": digest, "count": count})
            if sum(e["count"] for e in entries) != n:  # a writer bug, never a user error
                raise ShardError(f"split {name}: wrote {sum(e['count'] for e in entries)} of {n} samples")
            splits[name] = {"count": n, "shards": entries}
            log.info("split %s: %d images in %d shard(s)", name, n, len(entries))
        manifest = {
            "source": data.name,
            "resolution": int(h),
            "channels": int(c),
            "shape": [int(c), int(h), int(w)],
            "class_names": list(data.class_names),
            "roles": dict(roles),
            "splits": splits,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %s", out_dir / MANIFEST)
    return manifest
