"""The inference benchmarks: cache pairs (`trajectories`) and images (`sampling`) per second."""
from __future__ import annotations

import contextlib

import torch

from cmpipe.bench.common import frozen_teacher, memory, rate, rounded, setup, timed
from cmpipe.cm.precond import student_from_teacher
from cmpipe.distributed.device import pick_device
from cmpipe.models.networks import count_parameters

TRAJECTORIES_TARGET = 0.8  # of the limit: the teacher's forward throughput / 2 evaluations


def trajectories(batch_size: int | None = None, steps: int = 3, params_file: str = "params.yaml",
                 device: str = "auto", bf16: bool | None = None) -> dict:
    """Cache pairs/s (`pair_batch` over batches) against the teacher's forward images/s / 2."""
    from cmpipe.training.trajectories import pair_batch

    dev = pick_device(device)
    p, sig, net = setup(dev, params_file, "trajectories")
    tr = p.trajectories
    b = batch_size or tr.batch_size
    bf16 = tr.bf16 if bf16 is None else bf16
    teacher = frozen_teacher(net, sig)
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
        t_pairs += timed(pairs, dev)
        t_fwd += timed(forward, dev)
    pair_rate, fwd_rate = rate(steps * b, t_pairs), rate(steps * b, t_fwd)
    limit = fwd_rate / 2
    ratio = pair_rate / limit
    return {"bench": "trajectories", "device": dev.type, "threads": torch.get_num_threads(),
            "batch_size": b, "steps": steps, "bf16": bool(bf16 and dev.type == "cuda"),
            "parameters": count_parameters(net),
            "pairs_per_sec": rounded(pair_rate, 2), "teacher_forward_images_per_sec": rounded(fwd_rate, 2),
            "limit_pairs_per_sec": rounded(limit, 2), "ratio": rounded(ratio), "target": TRAJECTORIES_TARGET,
            "meets_target": ratio >= TRAJECTORIES_TARGET, **memory(dev)}


def sampling(batch_size: int | None = None, steps: int = 2, params_file: str = "params.yaml",
             device: str = "auto", teacher_nfe: int = 35) -> dict:
    """Images/s of the consistency model at 1 and 2 steps against the teacher's Heun sampler.

    The samplers are the sample stage's (`cm_sampler`, `heun_sampler`), timed as `generate`
    times them (the initial noise drawn outside); the three alternate batch by batch. The limit
    of a ratio is the ratio of network evaluations (35 / 1 and 35 / 2).
    """
    from cmpipe.cm.karras import heun_nfe_to_steps
    from cmpipe.cm.sampling import default_ts
    from cmpipe.sampling.sets import cm_sampler, heun_sampler
    from cmpipe.util.seeding import per_sample_randn

    dev = pick_device(device)
    p, sig, net = setup(dev, params_file, "sample")
    b = batch_size or p.sample.batch_size
    teacher = frozen_teacher(net, sig)
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
        return timed(lambda: samplers[kind](noise, idx), dev)

    warm = list(range(b))
    run("cm1", warm), run("cm2", warm)
    with torch.no_grad():  # the teacher's warm-up: one evaluation, not 35
        teacher(torch.randn(b, *shape, device=dev) * sig.sigma_max, torch.full((b,), sig.sigma_max, device=dev))
    times = dict.fromkeys(samplers, 0.0)
    for r in range(steps):
        idx = list(range(r * b, (r + 1) * b))
        for kind in samplers:
            times[kind] += run(kind, idx)
    rates = {k: rate(steps * b, t) for k, t in times.items()}
    out = {"bench": "sampling", "device": dev.type, "threads": torch.get_num_threads(), "batch_size": b,
           "steps": steps, "parameters": count_parameters(net), "nfe": nfe, "ts_2_steps": list(ts2),
           "images_per_sec": {k: rounded(v, 2) for k, v in rates.items()}}
    for k in ("cm1", "cm2"):
        ratio, limit = rates[k] / rates["teacher"], teacher_nfe / nfe[k]
        out[f"ratio_{k}_teacher"] = rounded(ratio)
        out[f"limit_{k}_teacher"] = rounded(limit)
        out[f"ratio_to_limit_{k}"] = rounded(ratio / limit)
    out.update(memory(dev))
    return out
