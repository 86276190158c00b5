"""Image transforms for the source readers: resize (centre crop + bicubic) or centre pad to a
square resolution, and conversion to 1 or 3 channels."""
from __future__ import annotations

import numpy as np
from PIL import Image

from cmpipe.data.base import DataError

ALPHA_BACKGROUNDS = ("white", "black", "refuse")
# A 16-bit gray PNG opens in one of these modes (Pillow's version decides which).
_WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _check_target(resolution: int, resize_mode: str, channels: int):
    if resize_mode not in ("resize", "pad"):
        raise DataError(f"resize_mode {resize_mode!r} must be 'resize' or 'pad'")
    if channels not in (1, 3):
        raise DataError(f"channels {channels!r} must be 1 or 3")
    if resolution < 1:
        raise DataError(f"resolution {resolution!r} must be positive")


def _pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def _to_8bit(im: Image.Image, what: str) -> Image.Image:
    """A 16-bit gray image scaled to 8 bits (v · 255 / 65535, rounded): `convert("L")` clips
    every value above 255 to white."""
    a = np.asarray(im)
    if a.dtype.kind == "i" and a.size and (a.min() < 0 or a.max() > 65535):
        raise DataError(f"{what}: a {im.mode} image with values {a.min()}..{a.max()}, outside the "
                        f"16-bit range 0..65535; save it as an 8- or 16-bit PNG")
    a = a.astype(np.uint32)
    return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")


def _composite(im: Image.Image, background: str, what: str) -> Image.Image:
    """An image with alpha (RGBA, LA, PA, P with transparency) composited on `background`."""
    im = im.convert("LA" if im.mode in ("LA", "La") else "RGBA")
    a = np.asarray(im).astype(np.uint32)
    alpha, color = a[..., -1:], a[..., :-1]
    if alpha.min() == 255:  # opaque everywhere: the background choice changes nothing
        return Image.fromarray(color.astype(np.uint8).squeeze(-1) if color.shape[-1] == 1
                               else color.astype(np.uint8))
    if background == "refuse":
        raise DataError(f"{what}: a transparent image ({im.mode}); set shard.alpha_background to "
                        f"white or black to composite it on that background, or remove its alpha")
    bg = 255 if background == "white" else 0
    out = ((color * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)
    return Image.fromarray(out.squeeze(-1) if out.shape[-1] == 1 else out)


def _normalise_mode(im: Image.Image, alpha_background: str, what: str) -> Image.Image:
    """16-bit gray scaled to 8 bits, alpha composited; other modes go to PIL's convert."""
    if im.mode in _WIDE_GRAY:
        return _to_8bit(im, what)
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (im.mode == "P" and "transparency" in im.info):
        return _composite(im, alpha_background, what)
    return im


def _to_channels_pil(im: Image.Image, channels: int) -> Image.Image:
    # 'L' is PIL's ITU-R 601-2 luma; gray -> RGB repeats the channel.
    return im.convert("L" if channels == 1 else "RGB")


def _resize_pil(im: Image.Image, resolution: int) -> Image.Image:
    w, h = im.size
    if w != h:
        # A non-square image is centre-cropped to its largest square first, so `resize` never
        # changes the aspect ratio of what is drawn (the usual preparation of image datasets).
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if im.size != (resolution, resolution):
        im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return im


def _pad_array(images: np.ndarray, resolution: int, what: str) -> np.ndarray:
    """Centre zero padding of N×H×W×C to N×R×R×C (the extra pixel of an odd margin goes last)."""
    _, h, w, _ = images.shape
    if h > resolution or w > resolution:
        raise DataError(f"{what}: an image of {h}×{w} pixels does not fit resolution {resolution} "
                        f"with resize_mode: pad (padding never shrinks); set shard.resize_mode: resize "
                        f"or shard.resolution >= {max(h, w)}")
    if h == resolution and w == resolution:
        return images
    top, left = (resolution - h) // 2, (resolution - w) // 2
    return np.pad(images, ((0, 0), (top, resolution - h - top), (left, resolution - w - left), (0, 0)))


def transform_images(images: np.ndarray, resolution: int, resize_mode: str, channels: int,
                     what: str = "images") -> np.ndarray:
    """uint8 N×H×W×C -> uint8 N×R×R×channels (resize: bicubic; pad: centre, zero padding)."""
    _check_target(resolution, resize_mode, channels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{what}: expected uint8 N×H×W×C with C = 1 or 3, got {images.dtype} "
                        f"{tuple(images.shape)}")
    n, h, w, c = images.shape
    if resize_mode == "pad":
        images = _pad_array(images, resolution, what)
    elif (h, w) != (resolution, resolution):
        out = np.empty((n, resolution, resolution, c), np.uint8)
        for i, img in enumerate(images):
            im = _resize_pil(_pil(img), resolution)
            out[i] = np.asarray(im).reshape(resolution, resolution, c)
        images = out
    if images.shape[-1] == channels:
        return np.ascontiguousarray(images)
    if channels == 3:  # gray -> RGB: repeat the channel
        return np.ascontiguousarray(np.repeat(images, 3, axis=-1))
    out = np.empty(images.shape[:3] + (1,), np.uint8)
    for i, img in enumerate(images):  # RGB -> gray through PIL's 'L' (same luma as elsewhere)
        out[i, ..., 0] = np.asarray(_pil(img).convert("L"))
    return out


def transform_image_file(im: Image.Image, resolution: int, resize_mode: str, channels: int,
                         what: str, alpha_background: str = "white") -> np.ndarray:
    """One decoded PIL image (any mode, any size) -> uint8 R×R×channels."""
    if alpha_background not in ALPHA_BACKGROUNDS:
        raise DataError(f"alpha_background {alpha_background!r} must be one of {', '.join(ALPHA_BACKGROUNDS)}")
    im = _to_channels_pil(_normalise_mode(im, alpha_background, what), channels)
    if resize_mode == "resize":
        arr = np.asarray(_resize_pil(im, resolution))
        return arr.reshape(resolution, resolution, channels)
    arr = np.asarray(im).reshape(im.size[1], im.size[0], channels)
    return _pad_array(arr[None], resolution, what)[0]
