"""Benchmarks that print one JSON line each: `python -m cmpipe.bench <name>`.

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
import json
import os
import resource
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see stages/__init__.py

import torch  # noqa: E402

from . import params as params_mod  # noqa: E402
from .distillation import cd_loss, cd_loss_online, student_from_teacher  # noqa: E402
from .karras import Sigmas  # noqa: E402
from .losses import teacher_heun_pair  # noqa: E402
from .networks import EDMDenoiser, build_unet, count_parameters, unet_config  # noqa: E402
from .training import ema_update, fast_cpu_defaults, pick_device  # noqa: E402


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _metric(name: str, lpips_resize: int | None, dev):
    if name != "lpips":
        return name
    from .lpips import load_lpips

    return load_lpips("alex", resize=lpips_resize, device=dev)


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
           "ratio": round(rate["cached"] / rate["online"], 3)}
    if names:
        out["cached_images_per_sec_by_metric"] = {m: round(rate[m], 2) for m in names}
        out["step_time_relative_to_l2"] = {m: round(rate["l2"] / rate[m], 3) for m in names}
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cmpipe.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="name", required=True)
    d = sub.add_parser("distill-step", help="cached vs online-teacher CD step")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--steps", type=int, default=10)
    d.add_argument("--metric", default="pseudo_huber", choices=["l2", "l1", "pseudo_huber", "lpips"])
    d.add_argument("--lpips-resize", type=lambda v: None if v == "none" else int(v), default=224,
                   help="LPIPS input size (distill.lpips_resize); 'none' keeps the image size")
    d.add_argument("--compare-metrics", action="store_true",
                   help="also time cached steps with l2, pseudo_huber and lpips, alternating")
    d.add_argument("--params", default="params.yaml", help="params file whose `model` section is benchmarked")
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = ap.parse_args(argv)
    if a.name == "distill-step":
        print(json.dumps(distill_step(a.batch_size, a.steps, a.metric, a.params, a.device,
                                      a.lpips_resize, a.compare_metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
