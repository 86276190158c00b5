"""The `loader` benchmark: the streaming shard loader against a teacher training step's consumption."""
from __future__ import annotations

import copy
import gc
import resource
import time
from pathlib import Path

import torch

from cmpipe.bench.common import memory, rate, rounded, setup, sync, timed
from cmpipe.cm.losses import edm_loss
from cmpipe.cm.precond import EDMDenoiser
from cmpipe.distributed.device import pick_device
from cmpipe.models.networks import count_parameters
from cmpipe.training.ema import ema_update

LOADER_TARGET = 10.0  # the loader must deliver >= 10x what the training step consumes
MANIFEST = Path("data/shards/manifest.json")


def _shard_files(shards) -> tuple[list[Path], tuple | None]:
    """(shard files, (C, H, W) or None) from --shards: shard files, or a manifest (its train split)."""
    from cmpipe.data import read_manifest, shard_paths

    shards = [Path(s) for s in (shards or [])]
    if not shards:
        if not MANIFEST.is_file():
            raise SystemExit(f"no --shards given and no {MANIFEST}: run `dvc repro shard` (or `dvc pull`) "
                             f"or name shard files with --shards")
        shards = [MANIFEST]
    if len(shards) == 1 and shards[0].suffix == ".json":
        return shard_paths(shards[0], role="train"), tuple(read_manifest(shards[0])["shape"])
    return shards, None


def loader(batch_size: int | None = None, steps: int = 5, params_file: str = "params.yaml",
           device: str = "auto", shards=None, workers: int = 2, shuffle_buffer: int = 1000,
           loader_batches: int = 200, seed: int = 0) -> dict:
    """Streaming loader (images/s) against a teacher training step's consumption (images/s).

    Each of `steps` rounds times one teacher step (EDM loss, Adam, gradient clipping, EMA) on the
    params' `teacher.batch_size`, then one fresh pass of the loader cut at `loader_batches` batches
    of the same size, from its start (persistent workers, so no process start-up; the time to the
    first batch, which fills the shuffle buffer, is counted). The ratio is loader / step.
    """
    from cmpipe.bench.streaming import image_loader  # webdataset: only for this benchmark

    dev = pick_device(device)
    files, shape = _shard_files(shards)
    p, sig, net = setup(dev, params_file, "teacher")
    t = p.teacher
    b = batch_size or t.batch_size
    model = EDMDenoiser(net, sig.sigma_data).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=t.lr)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(b, 1, 28, 28, generator=g) * 2 - 1).to(dev)

    def train_step():
        loss = edm_loss(model, x, t.P_mean, t.P_std, sig.sigma_data, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        ema_update(ema, model, t.ema_decays[0])

    dl = image_loader(files, b, workers, shuffle_buffer, seed, shape=shape, pin_memory=dev.type == "cuda")

    def loader_pass() -> tuple[int, float, float]:
        """(images, seconds, seconds to the first batch) of one pass cut at loader_batches."""
        it = iter(dl)  # a new pass (resets the persistent workers)
        sync(dev)
        t0 = time.perf_counter()
        n, first = 0, None
        for i, (images, labels) in enumerate(it):
            images = images.to(dev, non_blocking=True)
            labels = labels.to(dev, non_blocking=True)
            n += len(images)
            if first is None:
                first = time.perf_counter() - t0
            if i + 1 == loader_batches:
                break
        sync(dev)
        return n, time.perf_counter() - t0, first or 0.0

    for _ in range(2):  # warm-up: worker start-up, first allocations
        train_step()
    loader_pass()
    t_step = t_load = t_first = 0.0
    images = 0
    for _ in range(steps):
        t_step += timed(train_step, dev)
        n, dt, first = loader_pass()
        images, t_load, t_first = images + n, t_load + dt, t_first + first
    dl = None  # stops the workers; their peak RSS is then known
    gc.collect()
    step_rate, load_rate = rate(steps * b, t_step), rate(images, t_load)
    ratio = load_rate / step_rate
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"bench": "loader", "device": dev.type, "threads": torch.get_num_threads(), "workers": workers,
            "batch_size": b, "steps": steps, "shards": len(files), "shuffle_buffer": shuffle_buffer,
            "parameters": count_parameters(net), "images_timed": images,
            "loader_images_per_sec": rounded(load_rate, 1), "first_batch_s": rounded(t_first / steps),
            "train_step_images_per_sec": rounded(step_rate, 2),
            "ratio": rounded(ratio), "target": LOADER_TARGET,
            "meets_target": ratio >= LOADER_TARGET,
            **memory(dev), "worker_peak_rss_mb": round(children, 1)}
