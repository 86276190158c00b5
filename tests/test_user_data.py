"""A user's own dataset (issue 15): 16-bit and transparent PNGs, held-out splits, a tracked
source, checked caches and weights, one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cmpipe.data import load_source
from cmpipe.data.base import DataError

# ----------------------------------------------------------------------------- 16-bit and alpha

def test_16bit_gray_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520
    f = tmp_path / "imgs" / "c" / "ramp.png"
    f.parent.mkdir(parents=True)
    Image.fromarray(ramp).save(f)  # a real 16-bit gray PNG
    with Image.open(f) as im:
        assert im.mode in ("I;16", "I"), im.mode
    got = load_source("image_folder", tmp_path / "imgs", resolution=8, channels=1).splits["train"]
    expected = np.floor(ramp.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    assert np.array_equal(got.images[0, ..., 0], expected)
    assert got.images[0, 0, 1, 0] == 4 and (got.images == 255).mean() < 0.05  # 0, 4, 8 ... not white
    rgb = load_source("image_folder", tmp_path / "imgs", resolution=8, channels=3).splits["train"]
    assert np.array_equal(rgb.images[0], np.repeat(expected[..., None], 3, axis=-1))


def _rgba_folder(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere
    rgba[..., 3] = np.array([0, 128, 255, 255], np.uint8)[None, :]  # transparent .. opaque columns
    f = tmp_path / "imgs" / "c" / "a.png"
    f.parent.mkdir(parents=True)
    Image.fromarray(rgba, "RGBA").save(f)
    la = np.stack([np.full((4, 4), 100, np.uint8), np.full((4, 4), 0, np.uint8)], -1)
    Image.fromarray(la, "LA").save(f.parent / "b.png")
    return tmp_path / "imgs"


@pytest.mark.parametrize("background, bg", [("white", 255), ("black", 0)])
def test_alpha_is_composited_on_the_chosen_background(tmp_path, background, bg):
    root = _rgba_folder(tmp_path)
    im = load_source("image_folder", root, resolution=4, channels=3,
                     alpha_background=background).splits["train"].images
    a = np.array([0, 128, 255, 255])
    expected_r = (200 * a + bg * (255 - a) + 127) // 255
    expected_g = (0 * a + bg * (255 - a) + 127) // 255
    assert im[0, 0, :, 0].tolist() == expected_r.tolist()
    assert im[0, 0, :, 1].tolist() == expected_g.tolist()
    assert (im[1] == bg).all()  # the LA image is fully transparent: only the background is left


def test_alpha_refuse_names_the_file_and_the_key(tmp_path):
    root = _rgba_folder(tmp_path)
    with pytest.raises(DataError, match=r"c/a\.png: a transparent image.*shard\.alpha_background"):
        load_source("image_folder", root, resolution=4, channels=3, alpha_background="refuse")
    # an opaque RGBA image is not refused: its alpha changes nothing
    opaque = tmp_path / "opaque" / "c" / "o.png"
    opaque.parent.mkdir(parents=True)
    Image.fromarray(np.full((4, 4, 4), 255, np.uint8), "RGBA").save(opaque)
    out = load_source("image_folder", tmp_path / "opaque", resolution=4, channels=1,
                      alpha_background="refuse").splits["train"].images
    assert (out == 255).all()
