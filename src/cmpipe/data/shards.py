"""Webdataset shards: deterministic writing (byte-identical tars, replaced atomically) and safe
reading, which decodes only a whitelist of member types and never unpickles or `torch.load`s."""
from __future__ import annotations

import io
import itertools
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from cmpipe.data.base import ShardError
from cmpipe.data.png import _decode_image, encode_png
from cmpipe.data.tar import _iter_tar
from cmpipe.util.fileio import atomic_dir
from cmpipe.util.hashing import sha256_file

log = logging.getLogger(__name__)


IMAGE_EXTS = ("png", "jpg", "jpeg")
# Extensions write_shards encodes and read_records decodes (by the last dot-part of the member's
# extension, so "xn.npy" is an npy member). Everything else is refused.
WRITE_EXTS = ("png", "cls", "json", "npy", "txt")
READ_EXTS = IMAGE_EXTS + ("cls", "json", "npy", "txt")


# ----------------------------------------------------------------------------- writing

def _last_ext(ext: str) -> str:
    return ext.rsplit(".", 1)[-1].lower()


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"record __key__ must be a non-empty string, got {key!r}")
    if "." in key or "/" in key:
        # webdataset splits a member name at the first dot into key and extension, and a slash
        # would make a folder-like member name: either would corrupt the sample grouping.
        raise ValueError(f"record __key__ {key!r} must contain no '.' or '/' (use e.g. train_000123)")
    return key


def _encode_record(record: dict) -> dict:
    """The ShardWriter encoder: validate a record and turn every member into bytes."""
    if "__key__" not in record:
        raise ValueError(f"record without __key__ (members: {sorted(record)})")
    key = _check_key(record["__key__"])
    out: dict[str, Any] = {"__key__": key}
    for ext, value in record.items():
        if ext == "__key__":
            continue
        where = f"record {key!r} member {ext!r}"
        kind = _last_ext(ext)
        if not ext or ext.startswith("_") or "/" in ext or kind not in WRITE_EXTS:
            raise ValueError(f"{where}: unsupported member name; use one of {', '.join(WRITE_EXTS)} "
                             f"or a name ending in .npy (e.g. xn.npy)")
        try:
            if kind == "png":
                data = encode_png(value)
            elif kind == "cls":
                if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                    raise ValueError(f"cls needs an integer, got {type(value).__name__}")
                data = str(int(value)).encode("ascii")
            elif kind == "json":
                data = json.dumps(value, sort_keys=True, allow_nan=False).encode("utf-8")
            elif kind == "npy":
                buf = io.BytesIO()
                np.save(buf, np.asarray(value), allow_pickle=False)
                data = buf.getvalue()
            else:  # txt
                if not isinstance(value, str):
                    raise ValueError(f"txt needs a str, got {type(value).__name__}")
                data = value.encode("utf-8")
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None
        out[ext] = data
    return out


def _is_shard_dir(d: Path, prefix: str) -> bool:
    return all(p.is_file() and p.name.startswith(prefix + "-") and p.suffix == ".tar"
               for p in d.iterdir())


def write_shards(out_dir: str | Path, records: Iterable[dict], maxcount: int,
                 prefix: str = "shard") -> list[Path]:
    """Write records to ``out_dir/<prefix>-%06d.tar`` (at most `maxcount` records each).

    A record is a dict with ``__key__`` (no dots) and members named by extension: ``png``
    (uint8 H×W or H×W×C array), ``cls`` (int), ``json`` (JSON-able object), ``npy`` or any name
    ending in ``.npy`` such as ``xn.npy`` (numpy array, saved without pickle), ``txt`` (str).
    The same records give byte-identical shards. An existing `out_dir` holding only
    ``<prefix>-*.tar`` files is replaced; the new set appears at once (written beside it, then
    renamed). Returns the shard paths in order.
    """
    import webdataset as wds

    if not isinstance(maxcount, int) or maxcount < 1:
        raise ValueError(f"maxcount must be a positive integer, got {maxcount!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and _is_shard_dir(out_dir, prefix)):
        raise ShardError(f"{out_dir} exists and holds more than {prefix}-*.tar shards; refusing to "
                         f"replace it (choose an empty or new folder)")
    it = iter(records)
    first = next(it, None)
    if first is None:
        raise ShardError(f"no records to write to {out_dir}")
    with atomic_dir(out_dir) as tmp:
        # mtime=0: webdataset's default stamps every member with the current time, which makes
        # each run's shards differ and invalidates every later DVC stage. verbose=0: we log.
        with wds.ShardWriter(str(tmp / f"{prefix}-%06d.tar"), maxcount=maxcount, mtime=0,
                             encoder=_encode_record, verbose=0) as sink:
            for record in itertools.chain([first], it):
                sink.write(record)
        names = sorted(p.name for p in tmp.iterdir())
    paths = [out_dir / n for n in names]
    log.info("wrote %d shard(s) to %s", len(paths), out_dir)
    return paths


# ----------------------------------------------------------------------------- safe reading

_NAME_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key/extension split


def _iter_raw_samples(path: Path, check_headers: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group members into samples by key; refuse any extension outside READ_EXTS."""
    seen: set[str] = set()
    allowed: dict[str, bool] = {}  # extension -> decodable (few distinct ones: cache the test)
    key, members = None, {}
    for name, data in _iter_tar(path, check_headers):
        m = _NAME_RE.match(name)
        if m is None:
            raise ShardError(f"shard {path}: member {name} has no <key>.<extension> name")
        k, ext = m.group(1), m.group(2)
        ok = allowed.get(ext)
        if ok is None:
            ok = allowed[ext] = _last_ext(ext) in READ_EXTS
        if not ok:
            raise ShardError(f"shard {path}: member {name} has extension .{ext}, which is not decoded "
                             f"(allowed: {', '.join(READ_EXTS)}); refusing the shard rather than "
                             f"unpickling or loading unknown data")
        if k != key:
            if key is not None:
                yield key, members
            if k in seen:
                raise ShardError(f"shard {path}: key {k} appears twice (its members are not adjacent)")
            seen.add(k)
            key, members = k, {}
        elif ext in members:
            raise ShardError(f"shard {path}: member {name} appears twice")
        members[ext] = data
    if key is not None:
        yield key, members


def decode_member(ext: str, data: bytes, where: str = "member") -> Any:
    """Decode one member's bytes by its extension (the whitelist; anything else raises)."""
    kind = _last_ext(ext)
    try:
        if kind in IMAGE_EXTS:
            return _decode_image(data, where)
        if kind == "cls":
            return int(data.decode("ascii").strip())
        if kind == "json":
            return json.loads(data.decode("utf-8"))
        if kind == "npy":
            if not data.startswith(b"\x93NUMPY"):
                raise ValueError("not a .npy array")
            return np.load(io.BytesIO(data), allow_pickle=False)
        if kind == "txt":
            return data.decode("utf-8")
    except ShardError:
        raise
    except Exception as e:
        raise ShardError(f"{where}: cannot decode ({type(e).__name__}: {e})") from None
    raise ShardError(f"{where}: extension .{ext} is not decoded (allowed: {', '.join(READ_EXTS)}); "
                     f"refusing it rather than unpickling or loading unknown data")


def decode_sample(sample: dict) -> dict:
    """Decode a raw webdataset sample (ext -> bytes) with the safe whitelist.

    For streaming pipelines: ``wds.WebDataset(urls, shardshuffle=False).map(decode_sample)``
    instead of ``.decode()``, whose defaults unpickle ``.pyd`` members.
    """
    out = {}
    where = f"shard {sample.get('__url__', '?')} key {sample.get('__key__', '?')}"
    for k, v in sample.items():
        out[k] = v if k.startswith("__") else decode_member(k, v, f"{where} member .{k}")
    return out


def _as_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def read_records(paths: str | Path | Iterable[str | Path]) -> Iterator[dict]:
    """Iterate the samples of one or more shards, decoded with the safe whitelist.

    Each sample is ``{"__key__": key, "__url__": shard path, ext: value, ...}`` with images as
    uint8 arrays (H×W or H×W×C), ``cls`` as int, ``json`` as objects, ``npy`` as arrays, ``txt``
    as str. A member of any other extension, a truncated or corrupt shard, or an undecodable
    member raises a ShardError naming the shard (and member).
    """
    for path in _as_paths(paths):
        for key, members in _iter_raw_samples(path):
            sample = {"__key__": key, "__url__": str(path)}
            for ext, data in members.items():
                sample[ext] = decode_member(ext, data, f"shard {path} member {key}.{ext}")
            yield sample


def describe_shard(path: str | Path) -> tuple[str, int]:
    """(sha256, number of samples) of a shard, parsing it fully (so it is known to be readable)."""
    path = Path(path)
    return sha256_file(path), sum(1 for _ in _iter_raw_samples(path))
