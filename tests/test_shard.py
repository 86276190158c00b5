"""Tests of cmpipe.data (sources, shards) and the shard stage. Tiny synthetic data: fast."""
from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import Boom as _Boom
from PIL import Image

import cmpipe.data.manifest as manifest_module
from cmpipe.data import (
    DataError,
    ShardError,
    decode_pngs,
    decode_sample,
    encode_png,
    load_image_split,
    load_source,
    read_idx,
    read_manifest,
    read_records,
    read_source,
    sha256_file,
    shard_paths,
    transform_images,
    write_dataset,
    write_shards,
)
from cmpipe.data.png import _unfilter
from cmpipe.data.sources import FASHION_MNIST_CLASSES, list_splits

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------- helpers

def idx_bytes(array: np.ndarray) -> bytes:
    """A hand-made idx file: 0x0000 08 <ndim>, big-endian dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_dir(root: Path, n_train=5, n_test=3, size=(28, 28), seed=0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, *size), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images), mtime=0))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels), mtime=0))
        out[split] = (images, labels)
    return out


def npz_source(tmp_path: Path, n=20, shape=(6, 6), seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = np.arange(n) % 3
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "data.npz"
    np.savez(path, images=images, labels=labels, class_names=np.array(["a", "b", "c"]))
    return path, images, labels


def dataset_records(n=12, shape=(5, 5, 3), seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield {
            "__key__": f"s_{i:04d}",
            "png": rng.integers(0, 256, shape, dtype=np.uint8),
            "cls": i % 4,
            "json": {"i": i, "name": f"n{i}"},
            "xn.npy": rng.standard_normal((2, 3)).astype(np.float32),
            "txt": f"sample {i}",
        }


def save_image(path: Path, array: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_split_shards(tmp_path: Path, split="train", n=20, res=6, per_shard=7, seed=0):
    """A data/shards folder written by write_dataset from an npz source; returns (manifest, source)."""
    path, _, _ = npz_source(tmp_path, n=n, shape=(res, res), seed=seed)
    data = load_source("npz", path, resolution=res, channels=1)
    root = tmp_path / "repo"
    write_dataset(data, root / "data" / "shards", per_shard, {"train": "train", "ref": "train"},
                  root=root, progress=False)
    return root / "data" / "shards" / "manifest.json", data


# ----------------------------------------------------------------------------- sources

def test_idx_reader_reads_hand_written_file(tmp_path):
    raw = (b"\x00\x00\x08\x03" + struct.pack(">III", 2, 2, 3) + bytes(range(12)))
    (tmp_path / "img.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "lbl.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"\x07\x02"))
    images = read_idx(tmp_path / "img.gz", 3)
    assert images.shape == (2, 2, 3) and images.dtype == np.uint8
    assert images[1, 1].tolist() == [9, 10, 11]
    assert read_idx(tmp_path / "lbl.gz", 1).tolist() == [7, 2]
    with pytest.raises(DataError, match=r"img\.gz: idx magic number 2051 .*expected 2049"):
        read_idx(tmp_path / "img.gz", 1)  # an image file where labels were expected
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-1]))
    with pytest.raises(DataError, match="short.gz.*truncated"):
        read_idx(tmp_path / "short.gz", 3)


def test_fashion_mnist_source_from_idx_files(tmp_path):
    truth = write_fashion_dir(tmp_path, n_train=5, n_test=3)
    data = read_source("fashion_mnist", tmp_path)
    assert data.class_names == FASHION_MNIST_CLASSES and data.class_names[0] == "T-shirt/top"
    assert list(data.splits) == ["train", "test"]
    for split, (images, labels) in truth.items():
        assert data.splits[split].images.shape == (len(images), 28, 28, 1)
        assert np.array_equal(data.splits[split].images[..., 0], images)
        assert np.array_equal(data.splits[split].labels, labels.astype(np.int64))
    limited = read_source("fashion_mnist", tmp_path, limit=2)
    assert len(limited.splits["train"].images) == 2 and len(limited.splits["test"].images) == 2


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DataError) as e:
        read_source("fashion_mnist", tmp_path / "nowhere")
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    assert "shard.download: true" in msg


def test_missing_torchvision_copy_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"no torchvision copy found under .*shard.download: true"):
        read_source("mnist", tmp_path)


def test_mnist_from_a_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    truth = {}
    for prefix, n in (("train", 4), ("t10k", 2)):
        truth[prefix] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(truth[prefix]))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(n, dtype=np.uint8)))
    data = load_source("mnist", tmp_path, resolution=32, resize_mode="pad", channels=1, limit=3)
    assert data.class_names[0] == "0 - zero" and list(data.splits) == ["train", "test"]
    assert data.splits["train"].images.shape == (3, 32, 32, 1)
    assert np.array_equal(data.splits["train"].images[:, 2:30, 2:30, 0], truth["train"][:3])
    assert data.splits["test"].labels.tolist() == [0, 1]


@pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_with_limit():
    data = load_source("fashion_mnist", FASHION, resolution=28, channels=1, limit=200)
    for split in ("train", "test"):
        s = data.splits[split]
        assert s.images.shape == (200, 28, 28, 1) and s.images.dtype == np.uint8
        assert 0 <= s.labels.min() and s.labels.max() <= 9 and s.labels.dtype == np.int64
    assert data.splits["train"].labels[:3].tolist() == [9, 0, 0]  # the well-known first labels


def test_image_folder_classes_from_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    save_image(root / "dog" / "b.png", rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    save_image(root / "dog" / "a.jpg", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    save_image(root / "cat" / "deep" / "x.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))  # gray
    (root / "cat" / ".DS_Store").write_bytes(b"junk")  # hidden files are skipped
    data = load_source("image_folder", root, resolution=8, channels=3)
    assert data.class_names == ["cat", "dog"]
    assert list(data.splits) == ["train"]
    s = data.splits["train"]
    assert s.images.shape == (3, 8, 8, 3)
    assert s.labels.tolist() == [0, 1, 1]  # sorted: cat/deep/x.png, dog/a.jpg, dog/b.png
    gray = s.images[0]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    assert list_splits("image_folder", root) == ["train"]
    gray_data = load_source("image_folder", root, resolution=8, channels=1, limit=2)
    assert gray_data.splits["train"].images.shape == (2, 8, 8, 1)


def test_image_folder_train_test_layout(tmp_path):
    root = tmp_path / "imgs"
    for split, classes in (("train", ["a", "b"]), ("test", ["b", "c"])):
        for c in classes:
            save_image(root / split / c / "0.png", np.full((4, 4), 7, np.uint8))
    data = load_source("image_folder", root, resolution=4, channels=1)
    assert sorted(data.splits) == ["test", "train"]
    assert data.class_names == ["a", "b", "c"]  # one label space across splits
    assert data.splits["test"].labels.tolist() == [1, 2]


def test_image_folder_errors_name_the_input(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"{empty}.* is empty"):
        load_source("image_folder", empty, resolution=4, channels=1)
    (empty / "cls").mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_source("image_folder", empty, resolution=4, channels=1)

    bad = tmp_path / "bad"
    save_image(bad / "c" / "ok.png", np.zeros((4, 4), np.uint8))
    (bad / "c" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=r"bad/c/broken\.png: unreadable image"):
        load_source("image_folder", bad, resolution=4, channels=1)

    other = tmp_path / "other"
    save_image(other / "c" / "ok.png", np.zeros((4, 4), np.uint8))
    (other / "c" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"other/c/notes\.txt: not a PNG/JPEG image"):
        load_source("image_folder", other, resolution=4, channels=1)

    with pytest.raises(DataError, match="does not exist"):
        load_source("image_folder", tmp_path / "missing", resolution=4, channels=1)


def test_npz_source_gray_and_color(tmp_path):
    path, images, labels = npz_source(tmp_path, n=5, shape=(6, 6))
    data = read_source("npz", path)
    assert data.class_names == ["a", "b", "c"] and list(data.splits) == ["train"]
    assert np.array_equal(data.splits["train"].images[..., 0], images)
    assert data.splits["train"].labels.tolist() == labels.tolist()

    rgb = np.random.default_rng(1).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=rgb)  # no labels: all zero, one class
    data = load_source("npz", tmp_path / "rgb.npz", resolution=6, channels=3, limit=3)
    assert np.array_equal(data.splits["train"].images, rgb[:3])
    assert data.splits["train"].labels.tolist() == [0, 0, 0] and data.class_names == ["0"]


@pytest.mark.parametrize("arrays, match", [
    ({"pixels": np.zeros((2, 4, 4), np.uint8)}, "no array named 'images'"),
    ({"images": np.zeros((2, 4, 4), np.float32)}, "dtype float32; expected uint8"),
    ({"images": np.zeros((2, 4, 4, 2), np.uint8)}, r"shape \(2, 4, 4, 2\)"),
    ({"images": np.zeros((4, 4), np.uint8)}, r"shape \(4, 4\)"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(3, np.int64)}, "length 2"),
    ({"images": np.array([None, 1], dtype=object)}, "object arrays are refused"),
])
def test_npz_errors(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match):
        read_source("npz", path)


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.npz does not exist"):
        read_source("npz", tmp_path / "nope.npz")


def test_pad_versus_resize():
    img = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1) * 10 + 5
    padded = transform_images(img, 8, "pad", 1)
    assert padded.shape == (1, 8, 8, 1)
    assert np.array_equal(padded[0, 2:6, 2:6], img[0]) and padded.sum() == img.sum()  # centred
    resized = transform_images(img, 8, "resize", 1)
    expected = np.asarray(Image.fromarray(img[0, ..., 0]).resize((8, 8), Image.Resampling.BICUBIC))
    assert np.array_equal(resized[0, ..., 0], expected)
    assert not np.array_equal(resized, padded)
    odd = transform_images(np.ones((1, 3, 5, 1), np.uint8), 6, "pad", 1)
    assert odd[0, 1:4, 0:5, 0].all() and odd.sum() == 15  # top 1 / bottom 2, left 0 / right 1
    with pytest.raises(DataError, match="does not fit resolution 2.*resize_mode: resize"):
        transform_images(img, 2, "pad", 1)
    # channels: gray -> RGB repeats, RGB -> gray is PIL's 'L'
    rgb = transform_images(img, 4, "pad", 3)
    assert rgb.shape == (1, 4, 4, 3) and all(np.array_equal(rgb[..., k], img[..., 0]) for k in range(3))
    color = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    gray = transform_images(color, 4, "resize", 1)
    assert np.array_equal(gray[1, ..., 0], np.asarray(Image.fromarray(color[1]).convert("L")))


# ----------------------------------------------------------------------------- shards

def test_write_shards_is_byte_identical_and_round_trips(tmp_path):
    a = write_shards(tmp_path / "a", dataset_records(), maxcount=5)
    b = write_shards(tmp_path / "b", dataset_records(), maxcount=5)
    assert [p.name for p in a] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    with tarfile.open(a[0]) as tf:
        assert {m.mtime for m in tf.getmembers()} == {0}
    back = list(read_records(a))
    originals = list(dataset_records())
    assert [r["__key__"] for r in back] == [r["__key__"] for r in originals]
    for r, o in zip(back, originals):
        assert np.array_equal(r["png"], o["png"]) and r["cls"] == o["cls"] and r["json"] == o["json"]
        assert r["xn.npy"].dtype == np.float32 and np.array_equal(r["xn.npy"], o["xn.npy"])
        assert r["txt"] == o["txt"] and r["__url__"].endswith(".tar")
    # rewriting replaces the old set atomically; no temporary folder is left behind
    write_shards(tmp_path / "a", dataset_records(n=3), maxcount=5)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["shard-000000.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_write_shards_rejects_bad_records(tmp_path):
    with pytest.raises(ValueError, match=r"__key__ 'a\.b' must contain no '\.'"):
        write_shards(tmp_path / "x", [{"__key__": "a.b", "cls": 1}], maxcount=2)
    with pytest.raises(ValueError, match="member 'pyd': unsupported member name"):
        write_shards(tmp_path / "x", [{"__key__": "a", "pyd": {"x": 1}}], maxcount=2)
    with pytest.raises(ValueError, match="png needs a uint8 array"):
        write_shards(tmp_path / "x", [{"__key__": "a", "png": np.zeros((2, 2))}], maxcount=2)
    assert not any(tmp_path.iterdir())  # failed writes leave nothing behind
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="refusing to replace"):
        write_shards(tmp_path / "keep", dataset_records(n=1), maxcount=2)


def test_manifest_counts_shape_and_checksums(tmp_path, monkeypatch):
    manifest_path, data = make_split_shards(tmp_path, n=20, res=6, per_shard=7)
    m = read_manifest(manifest_path)
    assert m["source"] == "npz" and m["shape"] == [1, 6, 6] and m["resolution"] == 6
    assert m["channels"] == 1 and m["class_names"] == ["a", "b", "c"]
    assert m["roles"] == {"train": "train", "ref": "train"}
    split = m["splits"]["train"]
    assert split["count"] == 20 and [s["count"] for s in split["shards"]] == [7, 7, 6]
    root = manifest_path.parents[2]
    for s in split["shards"]:
        assert s["path"].startswith("data/shards/train/shard-")
        assert sha256_file(root / s["path"]) == s["sha256"]
    assert shard_paths(manifest_path, role="train") == [root / s["path"] for s in split["shards"]]
    first = next(read_records(root / split["shards"][0]["path"]))
    assert first["__key__"] == "train_000000" and set(first) == {"__key__", "__url__", "png", "cls"}

    images, labels = load_image_split(manifest_path, role="train")
    assert images.shape == (20, 1, 6, 6) and str(images.dtype) == "torch.uint8"
    assert str(labels.dtype) == "torch.int64"
    assert np.array_equal(images.numpy()[:, 0], data.splits["train"].images[..., 0])
    assert np.array_equal(labels.numpy(), data.splits["train"].labels)
    part, part_labels = load_image_split(manifest_path, split="train", limit=9)  # crosses a shard
    assert np.array_equal(part.numpy(), images.numpy()[:9]) and len(part_labels) == 9
    monkeypatch.setattr(manifest_module, "_LOAD_BATCH", 3)  # decode batches that split a shard
    small, small_labels = load_image_split(manifest_path, split="train")
    assert np.array_equal(small.numpy(), images.numpy()) and np.array_equal(small_labels, labels)
    with pytest.raises(ShardError, match="no role 'test'"):
        load_image_split(manifest_path, role="test")
    with pytest.raises(ValueError, match="exactly one of split"):
        load_image_split(manifest_path)


def test_write_dataset_is_byte_identical(tmp_path):
    m1, _ = make_split_shards(tmp_path / "one", n=9, per_shard=4)
    m2, _ = make_split_shards(tmp_path / "two", n=9, per_shard=4)
    assert m1.read_bytes() == m2.read_bytes()
    files1 = sorted(p.relative_to(m1.parent) for p in m1.parent.rglob("*"))
    assert files1 == sorted(p.relative_to(m2.parent) for p in m2.parent.rglob("*"))
    for rel in files1:
        if (m1.parent / rel).is_file():
            assert (m1.parent / rel).read_bytes() == (m2.parent / rel).read_bytes()


def _tar_with(path: Path, members: dict[str, bytes]):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_pickle_member_is_refused_without_unpickling(tmp_path):
    marker = str(tmp_path / "unpickled")
    shard = tmp_path / "evil.tar"
    _tar_with(shard, {"k_0.cls": b"1", "k_0.pyd": pickle.dumps(_Boom(marker))})
    with pytest.raises(ShardError, match=r"evil\.tar: member k_0\.pyd has extension \.pyd"):
        list(read_records(shard))
    # the same guard for raw webdataset samples (streaming pipelines)
    with pytest.raises(ShardError, match=r"k_0 member \.pth.*not decoded"):
        decode_sample({"__key__": "k_0", "__url__": str(shard), "pth": b"\x80\x04"})
    assert not os.path.exists(marker)


def test_truncated_shard_names_the_shard(tmp_path):
    manifest_path, _ = make_split_shards(tmp_path, n=20, per_shard=7)
    shard = shard_paths(manifest_path, split="train")[0]
    data = shard.read_bytes()
    with tarfile.open(shard) as tf:
        boundary = tf.getmembers()[4].offset  # a cut between two members: tarfile reads on silently
    for cut in (boundary, boundary + 700):  # ... and a cut inside a member
        shard.write_bytes(data[:cut])
        with pytest.raises(ShardError, match=rf"shard {shard}: truncated"):
            list(read_records(shard))
        with pytest.raises(ShardError, match=rf"{shard}.*truncated"):
            load_image_split(manifest_path, split="train", verify=False)
    with pytest.raises(ShardError, match=rf"shard {shard}: sha256 .* differs from the manifest"):
        load_image_split(manifest_path, split="train")
    shard.write_bytes(b"\x01" * 1024)
    with pytest.raises(ShardError, match=rf"shard {shard}: corrupt tar"):
        list(read_records(shard))


def test_wrong_image_shape_names_shard_and_key(tmp_path):
    root = tmp_path / "repo"
    out = root / "data" / "shards"
    images = [np.zeros((4, 4), np.uint8)] * 3 + [np.zeros((5, 4), np.uint8)]
    paths = write_shards(out / "train", ({"__key__": f"train_{i:06d}", "png": im, "cls": 0}
                                         for i, im in enumerate(images)), maxcount=10)
    manifest = {"source": "npz", "resolution": 4, "channels": 1, "shape": [1, 4, 4],
                "class_names": ["0"], "roles": {"train": "train", "ref": "train"},
                "splits": {"train": {"count": 4, "shards": [
                    {"path": "data/shards/train/shard-000000.tar", "sha256": sha256_file(paths[0]),
                     "count": 4}]}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"shard-000000\.tar key train_000003: image of shape \[1, 5, 4\]"):
        load_image_split(out / "manifest.json", role="train")
    images, _ = load_image_split(out / "manifest.json", role="train", limit=3)  # the good ones
    assert images.shape == (3, 1, 4, 4)


# ----------------------------------------------------------------------------- fast PNG decoder

def _filter_rows(img: np.ndarray, ftypes: list[int]) -> bytes:
    """Reference PNG filtering (spec section 9), plain Python, one filter type per row."""
    h, w, c = img.shape
    rows = img.reshape(h, w * c).astype(int)
    out = bytearray()
    for y, ft in enumerate(ftypes):
        out.append(ft)
        for x in range(w * c):
            a = rows[y, x - c] if x >= c else 0
            b = rows[y - 1, x] if y > 0 else 0
            cc = rows[y - 1, x - c] if (x >= c and y > 0) else 0
            if ft == 0:
                pred = 0
            elif ft == 1:
                pred = a
            elif ft == 2:
                pred = b
            elif ft == 3:
                pred = (a + b) // 2
            else:
                p = a + b - cc
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else cc)
            out.append((rows[y, x] - pred) % 256)
    return bytes(out)


def _png_from_filtered(raw: bytes, h: int, w: int, c: int) -> bytes:
    def chunk(t, body):
        return struct.pack(">I", len(body)) + t + body + struct.pack(">I", zlib.crc32(t + body))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"tEXt", b"k\x00v")
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("c", [1, 3])
def test_fast_png_decoder_matches_pil_for_every_filter(c):
    rng = np.random.default_rng(c)
    h, w = 6, 7
    imgs = [rng.integers(0, 256, (h, w, c), dtype=np.uint8) for _ in range(10)]
    blobs = [_png_from_filtered(_filter_rows(im, [(i + y) % 5 for y in range(h)]), h, w, c)
             for i, im in enumerate(imgs)]
    blobs.append(encode_png(imgs[0]))  # PIL's own encoding
    imgs.append(imgs[0])
    for blob, im in zip(blobs, imgs):  # the hand-made PNGs are valid: PIL agrees
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(blob))).reshape(h, w, c), im)
    out = decode_pngs(blobs, (h, w, c))
    assert np.array_equal(out, np.stack(imgs))
    raw = np.frombuffer(b"".join(_filter_rows(im, [4] * h) for im in imgs[:2]), np.uint8)
    assert np.array_equal(_unfilter(raw.reshape(2, h, 1 + w * c), w, c).reshape(2, h, w, c),
                          np.stack(imgs[:2]))
    # an interlaced PNG takes the PIL path and still decodes
    buf = io.BytesIO()
    Image.fromarray(imgs[1] if c == 3 else imgs[1][..., 0]).save(buf, format="PNG", interlace=1)
    assert np.array_equal(decode_pngs([buf.getvalue()], (h, w, c))[0], imgs[1])


# ----------------------------------------------------------------------------- the stage

def _stage_params(tmp_path: Path, **shard) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["shard"].update(shard)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


def test_stage_runs_and_matches_the_library(tmp_path):
    path, _, _ = npz_source(tmp_path, n=11, shape=(6, 6))
    work = _stage_params(tmp_path / "work", source="npz", path=str(path), resolution=8,
                         resize_mode="pad", channels=3, images_per_shard=4, ref_split="train")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "stages.shard"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((work / "data/shards/manifest.json").read_text())
    assert manifest["shape"] == [3, 8, 8] and manifest["splits"]["train"]["count"] == 11
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [4, 4, 3]
    assert not [p for p in (work / "data").iterdir() if p.name != "shards"]  # no temp dirs left
    # the stage's bytes are the library's bytes: same params, same output
    other = tmp_path / "other"
    data = load_source("npz", path, resolution=8, resize_mode="pad", channels=3)
    write_dataset(data, other / "data" / "shards", 4, {"train": "train", "ref": "train"},
                  root=other, progress=False)
    for f in (work / "data/shards").rglob("*"):
        if f.is_file():
            assert f.read_bytes() == (other / f.relative_to(work)).read_bytes(), f


def test_stage_refuses_a_missing_role_split(tmp_path, monkeypatch, capsys):
    path, _, _ = npz_source(tmp_path, n=3)
    work = _stage_params(tmp_path / "work", source="npz", path=str(path), resolution=6)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(REPO))
    from cmpipe.pipeline.stage import run_stage
    from stages import shard as stage
    with pytest.raises(SystemExit, match=r"shard\.ref_split = 'test' is not a split.*available: train"):
        run_stage("shard", stage.main)
    assert not (work / "data").exists()  # refused before any work
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["shard"]["resolution"] = 2
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit, match=r"shard\.resolution = 2 is below its minimum"):
        run_stage("shard", stage.main)
