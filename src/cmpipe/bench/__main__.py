"""Benchmarks that print one JSON line each: `python -m cmpipe.bench <name>`.

Every line has the measured figures, their ratio to the benchmark's limit, the device, the
threads and the peak memory (RSS, and torch.cuda.max_memory_allocated on a GPU). The two sides of
a ratio are measured in the same run, alternating, so that the machine's noise hits both alike.
Networks are randomly initialised from the params' `model` section at 28x28x1: the point is
throughput, which the weights do not change.

loader: decoded images per second of the streaming shard loader (`cmpipe.loader`: webdataset,
--workers DataLoader processes) against the images per second a teacher training step consumes
at the same batch; the loader must never be the bottleneck (ratio >= 10).

trajectories: cache pairs per second (`trajectories.pair_batch`, as the stage computes them)
against the teacher's raw forward throughput divided by the 2 evaluations of a Heun step
(ratio >= 0.8 of that limit).

sampling: images per second of the consistency model at 1 and 2 steps against the teacher's
Heun sampler at 35 NFE; the limit of each ratio is the ratio of evaluations (35 and 17.5).

scaling: global images per second of the cached CD step in 1 process and in 2 processes with
DDP (gloo on the CPU, NCCL on 2 GPUs); the limit of the ratio is 2 (efficiency = ratio / 2).

distill-step: in one process and on the same batch, a CD step that reads cached
teacher pairs against a CD step that runs the teacher's Heun step online
(2 teacher evaluations more per step). Steps alternate between the two kinds so
that the machine's noise hits both alike; the ratio is what to compare.
`--metric` picks the distance (l2, l1, pseudo_huber, lpips); `--compare-metrics`
adds cached steps with each of l2, pseudo_huber and lpips, alternating in the same
run, and their cost per step relative to l2: what LPIPS costs.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see stages/__init__.py

import torch  # noqa: E402

from cmpipe.cm.karras import Sigmas  # noqa: E402
from cmpipe.cm.losses import (  # noqa: E402
    cd_loss,
    cd_loss_online,
    teacher_heun_pair,  # noqa: E402
)
from cmpipe.cm.precond import (
    EDMDenoiser,  # noqa: E402
    student_from_teacher,  # noqa: E402
)
from cmpipe.distributed.device import fast_cpu_defaults, pick_device  # noqa: E402
from cmpipe.networks import build_unet, count_parameters, unet_config  # noqa: E402
from cmpipe.pipeline import params as params_mod  # noqa: E402
from cmpipe.training import ema_update  # noqa: E402


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory(dev) -> dict:
    """Peak memory of this process: RSS in MB, and the CUDA allocator's peak on a GPU."""
    out = {"peak_rss_mb": round(_peak_rss_mb(), 1)}
    if dev.type == "cuda":
        out["cuda_max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return out


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


def _unet(p, dev):
    """The params' UNet at 28x28x1, randomly initialised (seed 0)."""
    torch.manual_seed(0)
    return build_unet(unet_config(p.model.block_out_channels, p.model.layers_per_block,
                                  p.model.attention_levels, p.model.dropout, 28, 1)).to(dev)


def _rate(images: int, seconds: float) -> float:
    return images / max(seconds, 1e-12)


def _r(v: float, nd: int = 3) -> float:
    return round(float(v), nd)


def _metric(name: str, lpips_resize: int | None, dev):
    if name != "lpips":
        return name
    from cmpipe.metrics.lpips import load_lpips

    return load_lpips("alex", resize=lpips_resize, device=dev)


# The online step costs the teacher's 2 evaluations more than the cached one, whose student and
# target forwards and backward (about 2 forwards) make about 4: 6 / 4 = 1.5.
DISTILL_LIMIT = 1.5


def distill_step(batch_size: int, steps: int, metric: str, params_file: str, device: str,
                 lpips_resize: int | None = 224, compare_metrics: bool = False) -> dict:
    fast_cpu_defaults()
    dev = pick_device(device)
    p = params_mod.load_many("model", "diffusion", path=params_file)
    sig = Sigmas.from_params(p.diffusion)
    torch.manual_seed(0)
    net = build_unet(unet_config(p.model.block_out_channels, p.model.layers_per_block,
                                 p.model.attention_levels, p.model.dropout, 28, 1)).to(dev)
    teacher = EDMDenoiser(net, sig.sigma_data).eval().requires_grad_(False)
    student = student_from_teacher(net, sig).to(dev)
    target = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch_size, 1, 28, 28, generator=g) * 2 - 1).to(dev)
    z = torch.randn(x.shape, generator=g).to(dev)
    n = torch.randint(sig.num_scales - 1, (batch_size,), generator=g).to(dev)
    grid = sig.grid().float().to(dev)
    x_n, x_next = teacher_heun_pair(teacher, x, z, grid[n], grid[n + 1])  # the "cache"
    names = ["l2", "pseudo_huber", "lpips"] if compare_metrics else []
    metrics = {m: _metric(m, lpips_resize, dev) for m in {metric, *names}}

    def step(kind):
        if kind == "cached":
            loss = cd_loss(student, target, n, x_n, x_next, sig, metrics[metric])
        elif kind == "online":
            loss = cd_loss_online(student, target, teacher, x, n, z, sig, metrics[metric])
        else:  # a cached step with another distance
            loss = cd_loss(student, target, n, x_n, x_next, sig, metrics[kind])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(target, student, 0.95)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    kinds = ["cached", "online", *names]
    for kind in kinds:  # warm-up
        for _ in range(2):
            step(kind)
    times = dict.fromkeys(kinds, 0.0)
    for _ in range(steps):
        for kind in kinds:
            t0 = time.perf_counter()
            step(kind)
            times[kind] += time.perf_counter() - t0
    rate = {k: steps * batch_size / t for k, t in times.items()}
    out = {"bench": "distill-step", "device": dev.type, "threads": torch.get_num_threads(),
           "batch_size": batch_size, "steps": steps, "metric": metric,
           "lpips_resize": lpips_resize if "lpips" in metrics else None,
           "parameters": count_parameters(net),
           "cached_images_per_sec": round(rate["cached"], 2), "online_images_per_sec": round(rate["online"], 2),
           "ratio": round(rate["cached"] / rate["online"], 3), "limit": DISTILL_LIMIT,
           "ratio_to_limit": round(rate["cached"] / rate["online"] / DISTILL_LIMIT, 3)}
    if names:
        out["cached_images_per_sec_by_metric"] = {m: round(rate[m], 2) for m in names}
        out["step_time_relative_to_l2"] = {m: round(rate["l2"] / rate[m], 3) for m in names}
    out.update(_memory(dev))
    return out


# --------------------------------------------------------------------------- loader

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
    from cmpipe.bench.loader import image_loader
    from cmpipe.cm.losses import edm_loss

    fast_cpu_defaults()
    dev = pick_device(device)
    p = params_mod.load_many("model", "diffusion", "teacher", path=params_file)
    t = p.teacher
    b = batch_size or t.batch_size
    files, shape = _shard_files(shards)
    sig = Sigmas.from_params(p.diffusion)
    net = _unet(p, dev)
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
        ema_update(ema, model, t.ema_decay)

    dl = image_loader(files, b, workers, shuffle_buffer, seed, shape=shape, pin_memory=dev.type == "cuda")

    def loader_pass() -> tuple[int, float, float]:
        """(images, seconds, seconds to the first batch) of one pass cut at loader_batches."""
        it = iter(dl)  # a new pass (resets the persistent workers)
        _sync(dev)
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
        _sync(dev)
        return n, time.perf_counter() - t0, first or 0.0

    for _ in range(2):  # warm-up: worker start-up, first allocations
        train_step()
    loader_pass()
    t_step = t_load = t_first = 0.0
    images = 0
    for _ in range(steps):
        t_step += _timed(train_step, dev)
        n, dt, first = loader_pass()
        images, t_load, t_first = images + n, t_load + dt, t_first + first
    dl = None  # stops the workers; their peak RSS is then known
    gc.collect()
    step_rate, load_rate = _rate(steps * b, t_step), _rate(images, t_load)
    ratio = load_rate / step_rate
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"bench": "loader", "device": dev.type, "threads": torch.get_num_threads(), "workers": workers,
            "batch_size": b, "steps": steps, "shards": len(files), "shuffle_buffer": shuffle_buffer,
            "parameters": count_parameters(net), "images_timed": images,
            "loader_images_per_sec": _r(load_rate, 1), "first_batch_s": _r(t_first / steps),
            "train_step_images_per_sec": _r(step_rate, 2),
            "ratio": _r(ratio), "target": LOADER_TARGET,
            "meets_target": ratio >= LOADER_TARGET,
            **_memory(dev), "worker_peak_rss_mb": round(children, 1)}


# --------------------------------------------------------------------------- trajectories

TRAJECTORIES_TARGET = 0.8  # of the limit: the teacher's forward throughput / 2 evaluations


def trajectories(batch_size: int | None = None, steps: int = 3, params_file: str = "params.yaml",
                 device: str = "auto", bf16: bool | None = None) -> dict:
    """Cache pairs/s (`pair_batch` over batches) against the teacher's forward images/s / 2."""
    import contextlib

    from cmpipe.trajectories import pair_batch

    fast_cpu_defaults()
    dev = pick_device(device)
    p = params_mod.load_many("model", "diffusion", "trajectories", path=params_file)
    tr = p.trajectories
    b = batch_size or tr.batch_size
    bf16 = tr.bf16 if bf16 is None else bf16
    sig = Sigmas.from_params(p.diffusion)
    net = _unet(p, dev)
    teacher = EDMDenoiser(net, sig.sigma_data).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(1000, b), 1, 28, 28), dtype=torch.uint8, generator=g)
    grid = sig.grid().float()
    x = torch.randn(b, 1, 28, 28, generator=g).to(dev)
    sigma = grid[torch.randint(sig.num_scales - 1, (b,), generator=g)].to(dev)
    x = x * sigma.reshape(-1, 1, 1, 1)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and dev.type == "cuda"
                else contextlib.nullcontext())
    batch = 0

    def pairs():
        nonlocal batch
        pair_batch(teacher, images, range(batch * b, (batch + 1) * b), tr.seed, sig, dev, bf16)
        batch += 1

    @torch.inference_mode()
    def forward():
        with autocast:
            teacher(x, sigma)

    pairs(), forward()  # warm-up
    t_pairs = t_fwd = 0.0
    for _ in range(steps):
        t_pairs += _timed(pairs, dev)
        t_fwd += _timed(forward, dev)
    pair_rate, fwd_rate = _rate(steps * b, t_pairs), _rate(steps * b, t_fwd)
    limit = fwd_rate / 2
    ratio = pair_rate / limit
    return {"bench": "trajectories", "device": dev.type, "threads": torch.get_num_threads(),
            "batch_size": b, "steps": steps, "bf16": bool(bf16 and dev.type == "cuda"),
            "parameters": count_parameters(net),
            "pairs_per_sec": _r(pair_rate, 2), "teacher_forward_images_per_sec": _r(fwd_rate, 2),
            "limit_pairs_per_sec": _r(limit, 2), "ratio": _r(ratio), "target": TRAJECTORIES_TARGET,
            "meets_target": ratio >= TRAJECTORIES_TARGET, **_memory(dev)}


# --------------------------------------------------------------------------- sampling

def sampling(batch_size: int | None = None, steps: int = 2, params_file: str = "params.yaml",
             device: str = "auto", teacher_nfe: int = 35) -> dict:
    """Images/s of the consistency model at 1 and 2 steps against the teacher's Heun sampler.

    The samplers are the sample stage's (`cm_sampler`, `heun_sampler`), timed as `generate`
    times them (the initial noise drawn outside); the three alternate batch by batch. The limit
    of a ratio is the ratio of network evaluations (35 / 1 and 35 / 2).
    """
    from cmpipe.cm.karras import heun_nfe_to_steps
    from cmpipe.cm.sampling import default_ts
    from cmpipe.sample_sets import cm_sampler, heun_sampler
    from cmpipe.util.seeding import per_sample_randn

    fast_cpu_defaults()
    dev = pick_device(device)
    p = params_mod.load_many("model", "diffusion", "sample", path=params_file)
    b = batch_size or p.sample.batch_size
    sig = Sigmas.from_params(p.diffusion)
    net = _unet(p, dev)
    teacher = EDMDenoiser(net, sig.sigma_data).eval().requires_grad_(False)
    student = student_from_teacher(net, sig).to(dev).eval().requires_grad_(False)
    shape = (1, 28, 28)
    seed = p.sample.seed
    ts2 = p.sample.ts.get(2) or default_ts(2, sig.num_scales)
    samplers = {"cm1": cm_sampler(student, sig, [0], seed, shape),
                "cm2": cm_sampler(student, sig, list(ts2), seed, shape),
                "teacher": heun_sampler(teacher, sig, heun_nfe_to_steps(teacher_nfe))}
    nfe = {"cm1": 1, "cm2": 2, "teacher": teacher_nfe}

    def run(kind, idx) -> float:
        noise = per_sample_randn(seed, idx, shape).to(dev)
        return _timed(lambda: samplers[kind](noise, idx), dev)

    warm = list(range(b))
    run("cm1", warm), run("cm2", warm)
    with torch.no_grad():  # the teacher's warm-up: one evaluation, not 35
        teacher(torch.randn(b, *shape, device=dev) * sig.sigma_max, torch.full((b,), sig.sigma_max, device=dev))
    times = dict.fromkeys(samplers, 0.0)
    for r in range(steps):
        idx = list(range(r * b, (r + 1) * b))
        for kind in samplers:
            times[kind] += run(kind, idx)
    rate = {k: _rate(steps * b, t) for k, t in times.items()}
    out = {"bench": "sampling", "device": dev.type, "threads": torch.get_num_threads(), "batch_size": b,
           "steps": steps, "parameters": count_parameters(net), "nfe": nfe, "ts_2_steps": list(ts2),
           "images_per_sec": {k: _r(v, 2) for k, v in rate.items()}}
    for k in ("cm1", "cm2"):
        ratio, limit = rate[k] / rate["teacher"], teacher_nfe / nfe[k]
        out[f"ratio_{k}_teacher"] = _r(ratio)
        out[f"limit_{k}_teacher"] = _r(limit)
        out[f"ratio_to_limit_{k}"] = _r(ratio / limit)
    out.update(_memory(dev))
    return out


# --------------------------------------------------------------------------- scaling

SCALING_LIMIT = 2.0


def _cd_batch(teacher, sig: Sigmas, batch_size: int, dev):
    """A global batch of cached pairs (n, x_n, x_next), the same on every rank (seeded)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch_size, 1, 28, 28, generator=g) * 2 - 1).to(dev)
    z = torch.randn(x.shape, generator=g).to(dev)
    n = torch.randint(sig.num_scales - 1, (batch_size,), generator=g).to(dev)
    grid = sig.grid().float().to(dev)
    with torch.no_grad():
        x_n, x_next = teacher_heun_pair(teacher, x, z, grid[n], grid[n + 1])
    return n, x_n, x_next


def _scaling_worker(rank: int, world: int, init_file: str, out_dir: str, cfg: dict):
    """One rank of the scaling benchmark (started by torch.multiprocessing.spawn).

    Rounds alternate a one-process step (rank 0 alone, on the whole global batch, while rank 1
    waits at a barrier) and a DDP step (each rank on its part, `Dist.part`); a barrier closes
    each timed step, so a step's time is until every rank has finished it.
    """
    import json as json_mod

    import torch.distributed as td

    from cmpipe.distributed.ddp import Dist, wrap_ddp

    torch.set_num_threads(cfg["threads"])
    fast_cpu_defaults()
    if cfg["cuda"]:
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if cfg["cuda"] else "gloo"
    td.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        d = Dist(rank, world, rank, backend)
        p = params_mod.load_many("model", "diffusion", path=cfg["params"])
        sig = Sigmas.from_params(p.diffusion)
        net = _unet(p, dev)
        teacher = EDMDenoiser(net, sig.sigma_data).eval().requires_grad_(False)
        b = cfg["batch_size"]
        n, x_n, x_next = _cd_batch(teacher, sig, b, dev)
        metric = _metric(cfg["metric"], cfg["lpips_resize"], dev)

        def setup():
            student = student_from_teacher(net, sig).to(dev)
            target = copy.deepcopy(student).requires_grad_(False)
            return student, target, torch.optim.Adam(student.parameters(), lr=1e-4)

        single = setup() if d.is_main else None
        ddp = setup()
        wrap_ddp(ddp[0], d)
        part = d.part(b)

        def step(student, target, opt, rows):
            loss = cd_loss(student, target, n[rows], x_n[rows], x_next[rows], sig, metric)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(target, student, 0.95)

        def one():
            if single is not None:
                step(*single, slice(None))

        def timed(fn) -> float:
            td.barrier()
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            td.barrier()
            return time.perf_counter() - t0

        for _ in range(2):  # warm-up
            timed(one), timed(lambda: step(*ddp, part))
        t1 = t2 = 0.0
        for _ in range(cfg["steps"]):
            t1 += timed(one)
            t2 += timed(lambda: step(*ddp, part))
        res = {"rank": rank, "one_s": t1, "two_s": t2, "parameters": count_parameters(net), **_memory(dev)}
        Path(out_dir, f"rank{rank}.json").write_text(json_mod.dumps(res))
    finally:
        td.destroy_process_group()


def scaling(batch_size: int | None = None, steps: int = 5, params_file: str = "params.yaml",
            device: str = "auto", metric: str = "pseudo_huber", threads: int | None = None,
            lpips_resize: int | None = 224) -> dict:
    """Cached CD step throughput (global images/s) in 1 process and in 2 DDP processes.

    On the CPU each process, the single one included, gets `threads` threads (default: half of
    this process's), as each GPU is one device: the ratio is then what a second device brings.
    On CUDA it needs 2 GPUs (NCCL); `auto` uses them when there are 2, the CPU otherwise.
    """
    import torch.multiprocessing as mp

    world = 2
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda" and cuda_count < world:
        raise SystemExit(f"scaling on CUDA needs {world} GPUs (one per process); this machine has "
                         f"{cuda_count}: use --device cpu for the gloo measurement")
    cuda = device != "cpu" and cuda_count >= world
    p = params_mod.load_many("model", "diffusion", "distill", path=params_file)
    b = batch_size or p.distill.batch_size
    if b % world:
        raise SystemExit(f"--batch-size {b} does not split into {world} equal parts")
    threads = threads or max(1, torch.get_num_threads() // world)
    cfg = {"cuda": cuda, "threads": threads, "params": str(params_file), "batch_size": b,
           "steps": steps, "metric": metric, "lpips_resize": lpips_resize}
    with tempfile.TemporaryDirectory(prefix="cmpipe-scaling-") as tmp:
        mp.spawn(_scaling_worker, args=(world, str(Path(tmp, "init")), tmp, cfg), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    one, two = _rate(steps * b, ranks[0]["one_s"]), _rate(steps * b, ranks[0]["two_s"])
    ratio = two / one
    out = {"bench": "scaling", "device": "cuda" if cuda else "cpu", "backend": "nccl" if cuda else "gloo",
           "threads": threads, "processes": world, "batch_size": b, "steps": steps, "metric": metric,
           "parameters": ranks[0]["parameters"],
           "one_process_images_per_sec": _r(one, 2), "two_process_images_per_sec": _r(two, 2),
           "ratio": _r(ratio), "limit": SCALING_LIMIT, "efficiency": _r(ratio / SCALING_LIMIT),
           "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
           "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in ranks],
           "launcher_peak_rss_mb": round(_peak_rss_mb(), 1)}
    if cuda:
        out["cuda_max_memory_allocated_mb_per_rank"] = [r["cuda_max_memory_allocated_mb"] for r in ranks]
    return out


# --------------------------------------------------------------------------- command line

def _common(sp, steps: int, batch_help: str):
    sp.add_argument("--batch-size", type=int, default=None, help=f"default: the params' {batch_help}")
    sp.add_argument("--steps", type=int, default=steps, help="timed rounds (default %(default)s)")
    sp.add_argument("--params", default="params.yaml", help="params file whose `model` section is benchmarked")
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cmpipe.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="name", required=True)
    d = sub.add_parser("distill-step", help="cached vs online-teacher CD step")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--steps", type=int, default=10)
    d.add_argument("--metric", default="pseudo_huber", choices=["l2", "l1", "pseudo_huber", "lpips"])
    d.add_argument("--lpips-resize", type=_resize, default=224,
                   help="LPIPS input size (distill.lpips_resize); 'none' keeps the image size")
    d.add_argument("--compare-metrics", action="store_true",
                   help="also time cached steps with l2, pseudo_huber and lpips, alternating")
    d.add_argument("--params", default="params.yaml", help="params file whose `model` section is benchmarked")
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    lo = sub.add_parser("loader", help="streaming shard loader vs a teacher training step's consumption")
    _common(lo, 5, "teacher.batch_size")
    lo.add_argument("--shards", nargs="+", default=None,
                    help="shard files, or a manifest.json (its train split); default data/shards/manifest.json")
    lo.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    lo.add_argument("--shuffle-buffer", type=int, default=1000, help="samples per worker's shuffle buffer")
    lo.add_argument("--loader-batches", type=int, default=200, help="batches per timed loader pass")

    tr = sub.add_parser("trajectories", help="cache pairs/s vs the teacher's forward throughput / 2")
    _common(tr, 3, "trajectories.batch_size")
    tr.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast on CUDA (default: trajectories.bf16)")

    sa = sub.add_parser("sampling", help="consistency model at 1 and 2 steps vs the teacher at 35 NFE")
    _common(sa, 2, "sample.batch_size")
    sa.add_argument("--teacher-nfe", type=int, default=35, help="Heun NFE of the teacher (odd)")

    sc = sub.add_parser("scaling", help="cached CD step in 1 and 2 processes (DDP)")
    _common(sc, 5, "distill.batch_size")
    sc.add_argument("--metric", default="pseudo_huber", choices=["l2", "l1", "pseudo_huber", "lpips"])
    sc.add_argument("--lpips-resize", type=_resize, default=224)
    sc.add_argument("--threads", type=int, default=None,
                    help="CPU threads of each process (default: half of torch's default)")
    a = ap.parse_args(argv)
    if a.name == "distill-step":
        out = distill_step(a.batch_size, a.steps, a.metric, a.params, a.device, a.lpips_resize,
                           a.compare_metrics)
    elif a.name == "loader":
        out = loader(a.batch_size, a.steps, a.params, a.device, a.shards, a.workers, a.shuffle_buffer,
                     a.loader_batches)
    elif a.name == "trajectories":
        out = trajectories(a.batch_size, a.steps, a.params, a.device, a.bf16)
    elif a.name == "sampling":
        out = sampling(a.batch_size, a.steps, a.params, a.device, a.teacher_nfe)
    else:
        out = scaling(a.batch_size, a.steps, a.params, a.device, a.metric, a.threads, a.lpips_resize)
    print(json.dumps(out))
    return 0


def _resize(v: str) -> int | None:
    return None if v == "none" else int(v)


if __name__ == "__main__":
    sys.exit(main())
