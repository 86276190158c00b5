"""Choosing the evaluation EMA among several decay rates, by the FID of held-out samples, and the
held-out FID curve of a training run.

The official consistency-model runs keep several EMAs of the weights at once (`--ema_rate
0.999,0.9999,0.9999432189950708`) and the best one is picked afterwards. Here each EMA draws the
same `count` held-out samples (one seed for all: common random numbers, so the FIDs differ by the
weights and not by the draw), and the one with the lowest FID against the reference statistics is
used. `count` is far below Inception's 2048 dimensions, so the FID (`fid_few`) is biased upward;
the bias is nearly the same for every candidate, which is what a choice (or a training curve) needs.
"""
from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Callable

from cmpipe.util.fileio import atomic_write_json, atomic_write_text

SELECTION = "ema_selection.json"  # in the stage's reports folder: the record of the choice
CURVE = "heldout_fid.csv"  # images, ema, decay, fid: drawn by `dvc plots` (template fid_images)
SCORE = "heldout_fid"
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


class HeldoutFID:
    """`train(evaluate=...)`: the FID of `count` held-out samples (seed `seed`, `batch_size` a batch)
    of every evaluation EMA against the reference statistics at `ref_path`; `sampler_of(model)` is
    an EMA's sampler. The reference and Inception are loaded on the first call."""

    def __init__(self, sampler_of: Callable, count: int, seed: int, batch_size: int, shape, device,
                 ref_path: Path):
        self.sampler_of, self.count, self.seed, self.batch_size = sampler_of, count, seed, batch_size
        self.shape, self.device, self.ref_path, self.ref, self.inception = shape, device, Path(ref_path), None, None

    def __call__(self, images: int, emas: dict) -> dict:
        from cmpipe.metrics import fid as evaluation

        if self.ref is None:
            self.ref = evaluation.load_reference(self.ref_path)
            self.inception = evaluation.build_inception(self.device)
        fids = heldout_fids({n: self.sampler_of(m.eval()) for n, m in emas.items()}, self.count, self.batch_size,
                            self.shape, self.seed, self.device, self.ref, self.inception)
        log.info("held-out FID after %d images: %s", images, ", ".join(f"{n} {v:.2f}" for n, v in fids.items()))
        return {SCORE: fids}


def choose_ema(names: dict[str, float], history: list[dict], report_dir: Path, count: int | None = None,
               seed: int | None = None) -> tuple[str, dict]:
    """The name of the EMA that sampling uses ({name: decay}): the lowest of the last held-out FIDs
    in the training `history`, or the only one unscored. Writes the record of the choice and the
    curve of every scored EMA (`count` samples drawn with `seed`) to `report_dir`."""
    rows = [r for r in history if any(k.startswith(SCORE + "/") for k in r)]
    record = {"decays": dict(names), "fid": {}, "count": 0}
    if rows:
        fids = {n: rows[-1][f"{SCORE}/{n}"] for n in names}
        best = best_ema(fids)
        record.update(fid=fids, images=rows[-1]["images"], count=count, seed=seed)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["images", "ema", "decay", "fid"])
        for r in rows:
            for n, d in names.items():
                w.writerow([r["images"], n, f"{d:g}", f"{r[f'{SCORE}/{n}']:.6g}"])
        atomic_write_text(Path(report_dir) / CURVE, buf.getvalue())
    else:
        best = next(iter(names))
    record.update(chosen=best, chosen_decay=names[best])
    atomic_write_json(Path(report_dir) / SELECTION, record)
    return best, record
