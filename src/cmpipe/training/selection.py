"""Choosing the evaluation EMA among several decay rates, by the FID of held-out samples.

The official consistency-model runs keep several EMAs of the weights at once (`--ema_rate
0.999,0.9999,0.9999432189950708`) and the best one is picked afterwards. Here each EMA draws the
same `count` held-out samples (one seed for all: common random numbers, so the FIDs differ by the
weights and not by the draw), and the one with the lowest FID against the reference statistics is
used. `count` is far below Inception's 2048 dimensions, so the FID (`fid_few`) is biased upward;
the bias is nearly the same for every candidate, which is what a choice (or a training curve) needs.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

log = logging.getLogger(__name__)


def heldout_fids(samplers: dict[str, Callable], count: int, batch_size: int, shape, seed: int, device,
                 ref: dict, inception=None) -> dict[str, float]:
    """The FID of `count` samples drawn with `seed` by each sampler (a `sample_sets.generate` batch
    function) against the reference "mu" and "sigma" (`metrics.fid.load_reference`)."""
    from cmpipe.metrics import fid as evaluation
    from cmpipe.sampling.sets import generate

    if not samplers:
        raise ValueError("heldout_fids needs at least one sampler")
    if count < 2:
        raise ValueError(f"a held-out FID needs at least 2 samples, got {count}")
    model = inception if inception is not None else evaluation.build_inception(device)
    fids = {}
    for name, sampler in samplers.items():
        images, _ = generate(sampler, count, batch_size, shape, seed, device, f"held-out {name}")
        feats = evaluation.inception_features(images, model=model, progress=False, desc=f"held-out {name}")
        fids[name] = float(evaluation.fid_few(feats, ref["mu"], ref["sigma"]))
    return fids


def best_ema(fids: dict[str, float]) -> str:
    """The name with the lowest FID (ties: the first name in sorted order)."""
    finite = {n: f for n, f in fids.items() if math.isfinite(f)}
    if not finite:
        raise FloatingPointError(f"no EMA has a finite held-out FID ({fids}); the training diverged")
    return min(finite, key=lambda n: (finite[n], n))
