"""A streaming loader of training images from webdataset shards, for many GPUs and nodes.

`webdataset.WebDataset` streams the shard files; the shards are split between the nodes
(ranks) first, then between the DataLoader workers of each rank (`split_by_node`,
`split_by_worker`), so every image of a pass is read once across all ranks and workers.
Each worker shuffles its samples in a buffer and decodes whole batches with this project's
safe decoders (`cmpipe.data`): the PNGs of a batch through the vectorised `decode_pngs`, the
class through `decode_member`. webdataset's own `.decode()` is never used (its defaults
unpickle ``.pyd`` members); a member whose extension is not on the project's whitelist is
refused with a ShardError naming the shard, key and member, and is never decoded.

    for images, labels in stream_images(paths, batch_size=64, workers=4, shuffle_buffer=1000, seed=0):
        ...  # images: uint8 B×C×H×W (pinned on a CUDA machine), labels: int64 B

`image_loader` returns the DataLoader itself (reusable pass after pass, with persistent
workers); `stream_images` runs one pass of it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from cmpipe.data import ShardError, decode_member, decode_pngs
from cmpipe.data.shards import IMAGE_EXTS, READ_EXTS
from cmpipe.distributed.ddp import Dist


def _last_ext(ext: str) -> str:
    return ext.rsplit(".", 1)[-1].lower()


def _seed_of(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(list(map(int, parts))).encode()).digest()[:8], "little")


def _split_by_dist(d: Dist):
    """Shards of rank d.rank of d.world (what webdataset's split_by_node does from the
    environment, for an explicitly given Dist)."""
    def split(src):
        yield from itertools.islice(src, d.rank, None, d.world)
    return split


def _raw_image(sample: dict) -> tuple[str, str, str, bytes, int]:
    """(shard, key, image extension, image bytes, class) of a raw sample; refuses members off the
    whitelist without decoding them."""
    url, key = str(sample.get("__url__", "?")), str(sample.get("__key__", "?"))
    where = f"shard {url} key {key}"
    image = None
    for ext, data in sample.items():
        if ext.startswith("__"):
            continue
        kind = _last_ext(ext)
        if kind not in READ_EXTS:
            raise ShardError(f"{where} member .{ext}: extension .{ext} is not decoded (allowed: "
                             f"{', '.join(READ_EXTS)}); refusing it rather than unpickling or loading "
                             f"unknown data")
        if ext in IMAGE_EXTS:
            image = (ext, data)
    if image is None or "cls" not in sample:
        raise ShardError(f"{where}: needs an image (png) and a cls member, has "
                         f"{', '.join(sorted(k for k in sample if not k.startswith('__')))}")
    return url, key, image[0], image[1], decode_member("cls", sample["cls"], f"{where} member .cls")


def _decode_batch(batch: list[tuple[str, str, str, bytes, int]], shape: tuple[int, int, int] | None):
    """uint8 B×C×H×W and int64 B tensors of a batch of raw images."""
    url, key, ext, blob, _ = batch[0]
    if shape is None:  # the first image's shape; decode_pngs then insists every image has it
        first = decode_member(ext, blob, f"shard {url} key {key} member .{ext}")
        h, w = first.shape[:2]
        c = 1 if first.ndim == 2 else first.shape[2]
    else:
        c, h, w = shape
    shards = sorted({b[0] for b in batch})
    pix = decode_pngs([b[3] for b in batch], (h, w, c), [b[1] for b in batch],
                      where=f"shard {' or '.join(shards)}")
    images = torch.from_numpy(np.ascontiguousarray(pix.transpose(0, 3, 1, 2)))
    labels = torch.tensor([b[4] for b in batch], dtype=torch.int64)
    return images, labels


class _Batches:
    """The last stage of the webdataset pipeline: shuffle buffer, batching, safe decoding.

    The shuffle's generator is seeded with (seed, rank, worker, pass), so a run is repeatable
    and the workers and ranks shuffle differently.
    """

    def __init__(self, batch_size: int, shuffle_buffer: int, seed: int, rank: int,
                 shape: tuple[int, int, int] | None, partial: bool, decode_chunk: int):
        self.batch_size, self.shuffle_buffer, self.seed, self.rank = batch_size, shuffle_buffer, seed, rank
        self.shape, self.partial = shape, partial
        # PNGs are decoded a whole number of batches at a time, at least `decode_chunk` images:
        # the vectorised decoder is ~7x faster on 1024 images at once than on 64.
        self.per_chunk = batch_size * max(1, -(-decode_chunk // batch_size))
        self.passes = 0

    def _shuffled(self, samples: Iterator, rng: random.Random) -> Iterator:
        buf: list = []
        for s in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = rng.randrange(len(buf))
            buf[j], s = s, buf[j]
            yield s
        rng.shuffle(buf)
        yield from buf

    def __call__(self, samples: Iterator[dict]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(_seed_of(self.seed, self.rank, worker, self.passes))
        self.passes += 1
        raw = map(_raw_image, samples)
        if self.shuffle_buffer > 1:
            raw = self._shuffled(raw, rng)
        chunk = []
        for item in raw:
            chunk.append(item)
            if len(chunk) == self.per_chunk:
                yield from self._split(chunk)
                chunk = []
        if chunk:
            yield from self._split(chunk)

    def _split(self, chunk):
        keep = len(chunk) if self.partial else len(chunk) - len(chunk) % self.batch_size
        if keep == 0:
            return
        images, labels = _decode_batch(chunk[:keep], self.shape)
        for s in range(0, keep, self.batch_size):
            # clone: a batch owns its memory (a view would pickle the whole chunk to the main process)
            yield images[s:s + self.batch_size].clone(), labels[s:s + self.batch_size].clone()


def image_dataset(shard_paths: Iterable[str | Path], batch_size: int, shuffle_buffer: int = 1000,
                  seed: int = 0, dist: Dist | None = None, shape: tuple[int, int, int] | None = None,
                  partial: bool = True, decode_chunk: int = 1024):
    """The webdataset pipeline yielding decoded (images, labels) batches (an IterableDataset).

    `dist` None splits the shards by webdataset's `split_by_node` (the torchrun environment or
    the initialised process group); a `Dist` splits them by its rank and world size. `shape`
    (C, H, W), e.g. the manifest's, makes every image be checked against it. `partial` keeps
    the last, smaller batch of a worker's pass. PNGs are decoded `decode_chunk` images at a time.
    """
    import webdataset as wds

    urls = [str(p) for p in shard_paths]
    if not urls:
        raise ShardError("no shard files to stream")
    for u in urls:
        if not Path(u).is_file():
            raise ShardError(f"shard {u} not found; run `dvc repro shard` or `dvc pull`")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    world = dist.world if dist is not None else wds.utils.pytorch_worker_info()[1]
    if len(urls) < world:
        raise ShardError(f"{len(urls)} shard(s) cannot be split between {world} ranks: every rank needs "
                         f"at least one (write smaller shards: shard.images_per_shard)")
    rank = dist.rank if dist is not None else wds.utils.pytorch_worker_info()[0]
    shuffle = shuffle_buffer > 1
    ds = wds.WebDataset(urls, shardshuffle=len(urls) if shuffle else False, detshuffle=True, seed=seed,
                        nodesplitter=wds.split_by_node if dist is None else _split_by_dist(dist),
                        workersplitter=wds.split_by_worker, empty_check=False,
                        handler=wds.reraise_exception)
    return ds.compose(_Batches(batch_size, shuffle_buffer, seed, rank, shape, partial, decode_chunk))


def image_loader(shard_paths: Iterable[str | Path], batch_size: int, workers: int = 2,
                 shuffle_buffer: int = 1000, seed: int = 0, dist: Dist | None = None,
                 shape: tuple[int, int, int] | None = None, pin_memory: bool | None = None,
                 prefetch_factor: int = 4, persistent_workers: bool = True, partial: bool = True,
                 decode_chunk: int = 1024):
    """A torch DataLoader over `image_dataset`: `workers` processes decode, the main process
    receives whole batches (pinned when CUDA is available, unless `pin_memory` says otherwise).
    Each `iter()` is one pass over this rank's shards."""
    ds = image_dataset(shard_paths, batch_size, shuffle_buffer, seed, dist, shape, partial, decode_chunk)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    kw = {"prefetch_factor": prefetch_factor, "persistent_workers": persistent_workers} if workers > 0 else {}
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin, **kw)


def stream_images(shard_paths: Iterable[str | Path], batch_size: int, workers: int = 2,
                  shuffle_buffer: int = 1000, seed: int = 0, dist: Dist | None = None,
                  shape: tuple[int, int, int] | None = None,
                  pin_memory: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over this rank's part of the shards: (uint8 B×C×H×W images, int64 B labels).

    The order depends on (seed, rank, worker) only: give each epoch its own seed (e.g. seed + epoch)
    for a new order."""
    yield from image_loader(shard_paths, batch_size, workers, shuffle_buffer, seed, dist, shape,
                            pin_memory, persistent_workers=False)
