"""A strict, fast reader of the USTAR tar files that shards are.

Unlike `tarfile` it insists on the end-of-archive block (so a shard cut off between two members
is an error, not silently fewer samples), and it is about 10× faster on many tiny members.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from cmpipe.data.base import ShardError

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


def _tar_number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 encoding (members over 8 GiB)
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _iter_tar(path: Path, check_headers: bool = True) -> Iterator[tuple[str, bytes]]:
    """Yield (member name, data) of every regular member of a USTAR tar, strictly.

    Fails with a ShardError naming the shard on a bad header checksum, an unsupported member
    type (links, devices, GNU/pax extensions: ShardWriter writes none), or a file that ends
    before the end-of-archive block (a truncated shard). `check_headers=False` skips the header
    checksums, for callers that have just verified the whole file's sha256.
    """
    try:
        f = open(path, "rb", buffering=1 << 20)
    except OSError as e:
        raise ShardError(f"shard {path}: cannot open it ({e}); run `dvc repro shard` or `dvc pull`")
    fix = "re-create it with `dvc repro shard` or restore it with `dvc checkout`"
    with f:
        read = f.read
        file_size = os.fstat(f.fileno()).st_size
        offset = 0
        while True:  # the hot loop of every loader: keep it lean
            header = read(_BLOCK)
            if len(header) < _BLOCK:
                raise ShardError(f"shard {path}: truncated or corrupt tar (ends at byte "
                                 f"{offset + len(header)} without the end-of-archive block); {fix}")
            if header == _ZERO_BLOCK:
                return  # end of archive
            try:
                # fast path: 11 octal digits and a terminator, what tar writers emit
                size = int(header[124:135], 8) if header[135] in (0, 32) else _tar_number(header[124:136])
            except ValueError:
                try:
                    size = _tar_number(header[124:136])
                except ValueError:
                    raise ShardError(f"shard {path}: corrupt tar (bad size field at byte {offset}); {fix}")
            if check_headers:
                try:
                    stored = _tar_number(header[148:156])
                except ValueError:
                    stored = -1
                # the checksum treats its own 8-byte field as spaces
                if stored != sum(header) - sum(header[148:156]) + 8 * 32:
                    raise ShardError(f"shard {path}: corrupt tar (bad header checksum at byte "
                                     f"{offset}); {fix}")
            raw_name = header[:100].split(b"\0", 1)[0]
            if header[345] and header[257:262] == b"ustar":  # long names are split into a prefix
                raw_name = header[345:500].split(b"\0", 1)[0] + b"/" + raw_name
            name = raw_name.decode("utf-8", "replace")
            typeflag = header[156]
            padded = (size + _BLOCK - 1) & ~(_BLOCK - 1)
            if offset + _BLOCK + padded > file_size:  # also never allocate a bogus huge size
                raise ShardError(f"shard {path}: truncated tar (member {name} is cut off); {fix}")
            if typeflag in (48, 0, 53):  # b"0", NUL (regular files), b"5" (directory)
                data = read(size)
                rest = read(padded - size) if padded != size else b""
                if len(data) < size or len(rest) < padded - size:
                    raise ShardError(f"shard {path}: truncated tar (member {name} is cut off); {fix}")
                if typeflag != 53:  # directories carry no sample data
                    yield name, data
            else:
                raise ShardError(f"shard {path}: member {name} has tar type {chr(typeflag)!r} (link, "
                                 f"device or tar extension); shards hold plain files only")
            offset += _BLOCK + padded
