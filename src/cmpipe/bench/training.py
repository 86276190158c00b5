"""The consistency-distillation step benchmarks: cached against online teacher pairs
(`distill-step`), and the cached step in 1 and 2 DDP processes (`scaling`)."""
from __future__ import annotations

import copy
import functools
import json
import tempfile
from pathlib import Path

import torch

from cmpipe.bench.common import frozen_teacher, memory, peak_rss_mb, rate, rounded, setup, timed
from cmpipe.cm.losses import cd_loss, cd_loss_online, teacher_heun_pair
from cmpipe.cm.precond import student_from_teacher
from cmpipe.distributed.device import pick_device
from cmpipe.models.networks import count_parameters
from cmpipe.pipeline import params as params_mod
from cmpipe.pipeline.config import resolve_metric
from cmpipe.training.ema import ema_update

# The online step costs the teacher's 2 evaluations more than the cached one, whose student and
# target forwards and backward (about 2 forwards) make about 4: 6 / 4 = 1.5.
DISTILL_LIMIT = 1.5
SCALING_LIMIT = 2.0


def _cd_batch(teacher, sig, batch_size: int, dev):
    """(x, z, n, x_n, x_next): a seeded batch of images, noise and indices, and its cached pairs
    (the teacher's Heun step), the same on every rank."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch_size, 1, 28, 28, generator=g) * 2 - 1).to(dev)
    z = torch.randn(x.shape, generator=g).to(dev)
    n = torch.randint(sig.num_scales - 1, (batch_size,), generator=g).to(dev)
    grid = sig.grid().float().to(dev)
    with torch.no_grad():
        x_n, x_next = teacher_heun_pair(teacher, x, z, grid[n], grid[n + 1])
    return x, z, n, x_n, x_next


def _cd_models(net, sig, dev):
    """(student, EMA target, optimizer) of a CD run that starts from the teacher's weights."""
    student = student_from_teacher(net, sig).to(dev)
    target = copy.deepcopy(student).requires_grad_(False)
    return student, target, torch.optim.Adam(student.parameters(), lr=1e-4)


def _update(loss, student, target, opt):
    """One optimizer step on `loss`, then the target's EMA update."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    ema_update(target, student, 0.95)


def distill_step(batch_size: int, steps: int, metric: str, params_file: str, device: str,
                 lpips_resize: int | None = 224, compare_metrics: bool = False) -> dict:
    """Cached-pair CD step (images/s) against a CD step that runs the teacher's Heun step online."""
    dev = pick_device(device)
    _, sig, net = setup(dev, params_file)
    teacher = frozen_teacher(net, sig)
    student, target, opt = _cd_models(net, sig, dev)
    x, z, n, x_n, x_next = _cd_batch(teacher, sig, batch_size, dev)
    names = ["l2", "pseudo_huber", "lpips"] if compare_metrics else []
    metrics = {m: resolve_metric(m, lpips_resize=lpips_resize, device=dev) for m in {metric, *names}}

    def step(kind):
        if kind == "cached":
            loss = cd_loss(student, target, n, x_n, x_next, sig, metrics[metric])
        elif kind == "online":
            loss = cd_loss_online(student, target, teacher, x, n, z, sig, metrics[metric])
        else:  # a cached step with another distance
            loss = cd_loss(student, target, n, x_n, x_next, sig, metrics[kind])
        _update(loss, student, target, opt)

    kinds = ["cached", "online", *names]
    for kind in kinds:  # warm-up
        for _ in range(2):
            step(kind)
    times = dict.fromkeys(kinds, 0.0)
    for _ in range(steps):
        for kind in kinds:
            times[kind] += timed(functools.partial(step, kind), dev)
    rates = {k: rate(steps * batch_size, t) for k, t in times.items()}
    ratio = rates["cached"] / rates["online"]
    out = {"bench": "distill-step", "device": dev.type, "threads": torch.get_num_threads(),
           "batch_size": batch_size, "steps": steps, "metric": metric,
           "lpips_resize": lpips_resize if "lpips" in metrics else None,
           "parameters": count_parameters(net),
           "cached_images_per_sec": rounded(rates["cached"], 2), "online_images_per_sec": rounded(rates["online"], 2),
           "ratio": rounded(ratio), "limit": DISTILL_LIMIT, "ratio_to_limit": rounded(ratio / DISTILL_LIMIT)}
    if names:
        out["cached_images_per_sec_by_metric"] = {m: rounded(rates[m], 2) for m in names}
        out["step_time_relative_to_l2"] = {m: rounded(rates["l2"] / rates[m]) for m in names}
    out.update(memory(dev))
    return out


def _scaling_worker(rank: int, world: int, init_file: str, out_dir: str, cfg: dict):
    """One rank of the scaling benchmark (started by torch.multiprocessing.spawn).

    Rounds alternate a one-process step (rank 0 alone, on the whole global batch, while rank 1
    waits at a barrier) and a DDP step (each rank on its part, `Dist.part`); a barrier closes
    each timed step, so a step's time is until every rank has finished it.
    """
    import torch.distributed as td

    from cmpipe.distributed.ddp import Dist, wrap_ddp

    torch.set_num_threads(cfg["threads"])
    if cfg["cuda"]:
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if cfg["cuda"] else "gloo"
    td.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        d = Dist(rank, world, rank, backend)
        _, sig, net = setup(dev, cfg["params"])
        b = cfg["batch_size"]
        _, _, n, x_n, x_next = _cd_batch(frozen_teacher(net, sig), sig, b, dev)
        metric = resolve_metric(cfg["metric"], lpips_resize=cfg["lpips_resize"], device=dev)
        single = _cd_models(net, sig, dev) if d.is_main else None
        ddp = _cd_models(net, sig, dev)
        wrap_ddp(ddp[0], d)
        part = d.part(b)

        def step(student, target, opt, rows):
            _update(cd_loss(student, target, n[rows], x_n[rows], x_next[rows], sig, metric), student, target, opt)

        def one():
            if single is not None:
                step(*single, slice(None))

        def timed_all(fn) -> float:  # from and until every rank is there
            td.barrier()
            return timed(fn, dev, td.barrier)

        for _ in range(2):  # warm-up
            timed_all(one), timed_all(lambda: step(*ddp, part))
        t1 = t2 = 0.0
        for _ in range(cfg["steps"]):
            t1 += timed_all(one)
            t2 += timed_all(lambda: step(*ddp, part))
        res = {"rank": rank, "one_s": t1, "two_s": t2, "parameters": count_parameters(net), **memory(dev)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
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
    one, two = rate(steps * b, ranks[0]["one_s"]), rate(steps * b, ranks[0]["two_s"])
    ratio = two / one
    out = {"bench": "scaling", "device": "cuda" if cuda else "cpu", "backend": "nccl" if cuda else "gloo",
           "threads": threads, "processes": world, "batch_size": b, "steps": steps, "metric": metric,
           "parameters": ranks[0]["parameters"],
           "one_process_images_per_sec": rounded(one, 2), "two_process_images_per_sec": rounded(two, 2),
           "ratio": rounded(ratio), "limit": SCALING_LIMIT, "efficiency": rounded(ratio / SCALING_LIMIT),
           "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
           "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in ranks],
           "launcher_peak_rss_mb": round(peak_rss_mb(), 1)}
    if cuda:
        out["cuda_max_memory_allocated_mb_per_rank"] = [r["cuda_max_memory_allocated_mb"] for r in ranks]
    return out
