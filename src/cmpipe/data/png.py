"""PNG for shards: the deterministic encoder, a vectorised batch decoder for the plain PNGs
`encode_png` writes (with PIL as the fallback), and the checked single-image decoder."""
from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

from cmpipe.data.base import ShardError

PNG_COMPRESS_LEVEL = 6  # fixed: the level is part of the bytes, so part of reproducibility


def encode_png(image: Any) -> bytes:
    """uint8 H×W or H×W×C (C = 1, 3, 4) -> PNG bytes; deterministic (no metadata, fixed level)."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"png needs a uint8 array, got {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ValueError(f"png needs an H×W or H×W×C (C = 1, 3 or 4) array, got shape {a.shape}")
    buf = io.BytesIO()
    # No pnginfo: PIL then writes only IHDR/IDAT/IEND, no time stamp or other metadata.
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _decode_image(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode == "1":
                im = im.convert("L")
            elif im.mode in ("P", "PA"):
                im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
            elif im.mode in ("CMYK", "YCbCr"):
                im = im.convert("RGB")
            if im.mode not in ("L", "LA", "RGB", "RGBA"):
                raise ValueError(f"image mode {im.mode} is not 8-bit gray or colour")
            return np.array(im)
    except Exception as e:
        raise ShardError(f"{where}: undecodable image ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- fast batch decoding

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_head(h: int, w: int, c: int) -> bytes:
    """Signature + IHDR chunk (with CRC) of a plain 8-bit gray/RGB non-interlaced h×w PNG."""
    body = b"IHDR" + struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return _PNG_SIGNATURE + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))


def _png_scanlines(blob: bytes, h: int, w: int, c: int, head: bytes | None = None) -> bytes | None:
    """The filtered scanlines of a plain 8-bit gray/RGB, non-interlaced PNG of the given size.

    None for anything else (other sizes, modes, interlacing, bad CRCs): the caller then decodes
    with PIL, which handles every PNG and reports errors properly.
    """
    head = head or _png_head(h, w, c)
    if not blob.startswith(head):  # one comparison checks signature, size, mode and IHDR CRC
        return None
    pos, n, idat = len(head), len(blob), []
    while pos + 12 <= n:
        length = int.from_bytes(blob[pos:pos + 4], "big")
        ctype = blob[pos + 4:pos + 8]
        end = pos + 8 + length
        if end + 4 > n:
            return None
        if ctype == b"IDAT":
            body = blob[pos + 8:end]
            if zlib.crc32(body, _CRC_IDAT) != int.from_bytes(blob[end:end + 4], "big"):
                return None
            idat.append(body)
        elif ctype == b"IEND":
            break
        elif not ctype[0] & 0x20 and ctype != b"PLTE":  # an unknown critical chunk
            return None
        pos = end + 4
    if not idat:
        return None
    try:
        raw = zlib.decompress(idat[0] if len(idat) == 1 else b"".join(idat))
    except zlib.error:
        return None
    return raw if len(raw) == h * (1 + w * c) else None


_CRC_IDAT = zlib.crc32(b"IDAT")


def _unfilter(raw: np.ndarray, w: int, c: int) -> np.ndarray | None:
    """Undo PNG scanline filters for a batch: raw n×h×(1+w·c) -> n×h×(w·c), vectorised over images.

    The five PNG filter types (None, Sub, Up, Average, Paeth), uint8 arithmetic wraps mod 256 as
    the PNG spec requires. Sub is a running sum; Average and Paeth depend on the pixel to the
    left, so they loop over the row's pixels (vectorised across images and channels).
    """
    n, h, _ = raw.shape
    rowlen = w * c
    out = np.empty((n, h, rowlen), np.uint8)
    prev = np.zeros((n, rowlen), np.uint8)
    for y in range(h):
        ftype = raw[:, y, 0]
        line = raw[:, y, 1:]
        cur = out[:, y]
        if ftype.max(initial=0) > 4:
            return None
        for ft in np.unique(ftype):
            sel = np.flatnonzero(ftype == ft)
            x, up = line[sel], prev[sel]
            if ft == 0:
                res = x
            elif ft == 1:
                res = np.cumsum(x.reshape(-1, w, c), axis=1, dtype=np.uint8).reshape(-1, rowlen)
            elif ft == 2:
                res = x + up
            else:
                res = np.empty_like(x)
                left = np.zeros((len(sel), c), np.int16)
                upleft = np.zeros((len(sel), c), np.int16)
                for i in range(w):
                    s = slice(i * c, (i + 1) * c)
                    b = up[:, s].astype(np.int16)
                    if ft == 3:
                        pred = (left + b) >> 1
                    else:
                        p = left + b - upleft
                        pa, pb, pc = np.abs(p - left), np.abs(p - b), np.abs(p - upleft)
                        pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, b, upleft))
                    v = (x[:, s].astype(np.int16) + pred) & 0xFF
                    res[:, s] = v
                    left, upleft = v, b
            cur[sel] = res
        prev = cur
    return out


def decode_pngs(blobs: list[bytes], shape_hwc: tuple[int, int, int], names: list[str] | None = None,
                where: str = "shard") -> np.ndarray:
    """Decode PNGs that should all be H×W×C into one uint8 n×H×W×C array.

    Plain 8-bit gray/RGB PNGs of that size (what this module writes) take a vectorised path;
    any other PNG goes through PIL. A decoded image of another shape raises a ShardError naming
    `where` and the image's name.
    """
    h, w, c = shape_hwc
    n = len(blobs)
    out = np.empty((n, h, w, c), np.uint8)
    linelen = 1 + w * c
    chunk = max(1, (32 << 20) // (h * linelen))  # bounds the scratch memory for big images
    head = _png_head(h, w, c)
    for start in range(0, n, chunk):
        idx = range(start, min(n, start + chunk))
        fast, slow = [], []
        for i in idx:
            raw = _png_scanlines(blobs[i], h, w, c, head)
            (fast if raw is not None else slow).append((i, raw))
        if fast:
            raw = np.frombuffer(b"".join(r for _, r in fast), np.uint8).reshape(len(fast), h, linelen)
            pix = _unfilter(raw, w, c)
            if pix is None:
                slow.extend((i, None) for i, _ in fast)
            else:
                out[[i for i, _ in fast]] = pix.reshape(len(fast), h, w, c)
        for i, _ in slow:
            name = names[i] if names else str(i)
            img = _decode_image(blobs[i], f"{where} key {name}")
            if img.ndim == 2:
                img = img[..., None]
            if img.shape != (h, w, c):
                raise ShardError(f"{where} key {name}: image of shape {_chw(img.shape)} (C×H×W), "
                                 f"but the manifest says {[c, h, w]}; re-create the shards with "
                                 f"`dvc repro shard`")
            out[i] = img
    return out


def _chw(hwc: tuple) -> list[int]:
    return [int(hwc[2]), int(hwc[0]), int(hwc[1])]
