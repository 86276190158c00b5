"""The plan of the sample stage: which sets params `sample` ask for, checked before any work,
the ts search that may refine the consistency model's ts, and the sampling of every set.

Names and kinds of sets are `cmpipe.sampling.kinds`; sets.json records the plan.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cmpipe.cm.karras import Sigmas, heun_nfe_to_steps
from cmpipe.cm.sampling import check_ts, default_ts
from cmpipe.errors import ParamsError
from cmpipe.sampling.kinds import KINDS, set_file, set_name
from cmpipe.sampling.sets import Labels, cm_sampler, dpm_sampler, euler_sampler, generate, heun_sampler
from cmpipe.util.fileio import atomic_savez
from cmpipe.util.images import class_rows, save_grid

log = logging.getLogger(__name__)


def params_ts(s, steps: int, num_scales: int) -> list[int]:
    """The grid indices of `steps`-step consistency sampling: `sample.ts`, else evenly spaced."""
    return s.ts.get(steps, default_ts(steps, num_scales))


def plan_sets(s, sig: Sigmas) -> dict[str, dict]:
    """Validate the requested sets (params `sample`) before any work: name -> {kind, nfe, ts | steps}."""
    sets = {}
    for k in s.steps:
        ts = params_ts(s, k, sig.num_scales)
        try:
            check_ts(ts, sig.num_scales, f"sample.ts.{k}")
        except ValueError as e:
            raise ParamsError(str(e)) from None
        sets[set_name("cm", k)] = {"kind": "cm", "nfe": k, "ts": ts}
    for nfe in s.teacher_heun_nfe:
        try:
            steps = heun_nfe_to_steps(nfe)
        except ValueError as e:
            raise ParamsError(str(e)) from None
        sets[set_name("teacher_heun", nfe)] = {"kind": "teacher_heun", "nfe": nfe, "steps": steps}
    for kind in ("teacher_euler", "teacher_dpm"):
        for nfe in getattr(s, f"{kind}_nfe"):
            if nfe < 1:
                raise ParamsError(f"sample.{kind}_nfe: NFE must be at least 1, got {nfe}")
            sets[set_name(kind, nfe)] = {"kind": kind, "nfe": nfe}
    return sets


def search_cm_ts(sets: dict[str, dict], s, sig: Sigmas, f, shape, device, ref_path: Path,
                 labels: Labels | None, dist, parts_dir: Path) -> dict:
    """With `sample.search_ts`, search the ts of 2 and more steps on FID (`ts_search`) and put the
    chosen ts into the plan's cm sets; returns the search's report (only {"search_ts": False} without).

    The ts given in params start the refinement and stay unless the search's ts beats them with
    confidence (paired bootstrap of the search's samples); `labels` are the search seed's classes.
    """
    from cmpipe.metrics import fid as evaluation
    from cmpipe.sampling.ts_search import CONFIDENCE, search_ts_by_fid

    search = {"search_ts": s.search_ts}
    if not s.search_ts:
        return search
    search_steps = max(s.steps)
    if search_steps < 2:
        raise ParamsError("sample.search_ts needs a step count of 2 or more in sample.steps")
    if s.search_seed == s.seed:
        raise ParamsError("sample.search_seed must differ from sample.seed: the search's samples "
                          "are held out from the evaluated sets")
    ref = evaluation.load_reference(ref_path)
    start = {k: params_ts(s, k, sig.num_scales) for k in range(2, search_steps + 1)}
    chosen, fids, win_rates = search_ts_by_fid(f, sig, shape, search_steps, s.search_count, s.search_seed,
                                               s.batch_size, device, ref, s.search_method, start=start,
                                               labels=labels, dist=dist, parts_dir=parts_dir)
    for k, ts in chosen.items():
        name = set_name("cm", k)
        if name in sets:
            sets[name].update(ts=ts, ts_searched=True)
    search.update(method=s.search_method, count=s.search_count, seed=s.search_seed,
                  chosen={str(k): ts for k, ts in chosen.items()}, fid=fids,
                  confidence=CONFIDENCE, win_rate={str(k): v for k, v in win_rates.items()},
                  params_ts={str(k): start[k] for k in chosen})
    log.info("searched ts: %s", chosen)
    return search


@dataclass
class SetSamplers:
    """What every set of a plan samples with: the consistency function f, the teacher's denoiser D,
    and what the sets share (initial noises of `seed`, classes, clipping of the teacher's D)."""
    f: object
    teacher: object
    sig: Sigmas
    shape: tuple[int, int, int]
    seed: int
    labels: Labels | None = None
    clip_denoised: bool = False

    def for_set(self, info: dict):
        """The batch sampler of one planned set (`plan_sets`), by its kind."""
        kind = info.get("kind")
        if kind == "cm":
            return cm_sampler(self.f, self.sig, info["ts"], self.seed, self.shape, self.labels)
        if kind == "teacher_heun":
            return heun_sampler(self.teacher, self.sig, info["steps"], self.labels, self.clip_denoised)
        if kind == "teacher_euler":
            return euler_sampler(self.teacher, self.sig, info["nfe"], self.labels, self.clip_denoised)
        if kind == "teacher_dpm":
            return dpm_sampler(self.teacher, self.sig, info["nfe"], self.labels, self.clip_denoised)
        raise ValueError(f"sample set {info!r} has kind {kind!r}: use one of {KINDS} (see plan_sets)")


def sample_sets(sets: dict[str, dict], samplers: SetSamplers, count: int, batch_size: int, device, dist,
                samples_dir: Path, grids_dir: Path, num_classes: int | None = None,
                class_label: int | None = None) -> dict[str, dict]:
    """Sample and write every planned set: <samples_dir>/<set>.npz (uint8 N×H×W×C `images`, and
    `labels` for a conditional model) and <grids_dir>/<set>.png (first 64, or one row per class).
    Adds count, device (and classes) to each set's description; returns seconds per image per set.
    Under torchrun rank 0 writes everything (the ranks' parts pass through beside `samples_dir`)."""
    timing = {}
    for name, info in sets.items():
        images, spi = generate(samplers.for_set(info), count, batch_size, samplers.shape, samplers.seed, device,
                               name, dist=dist, parts_dir=samples_dir)
        if not dist.is_main:  # its batches went to rank 0, which writes the set
            continue
        if samplers.labels is None:
            atomic_savez(set_file(samples_dir, name), images=images)
            save_grid(images[:64], grids_dir / f"{name}.png", nrow=8)
        else:  # the classes of the set beside its images; the grid has one row per class
            y = samplers.labels(range(count)).numpy()
            atomic_savez(set_file(samples_dir, name), images=images, labels=y)
            save_grid(class_rows(images, y, num_classes), grids_dir / f"{name}.png", nrow=8)
            info.update(classes=num_classes, class_label=class_label)
        info.update(count=count, device=device.type)
        timing[name] = {"seconds_per_image": spi, "device": device.type}
        log.info("%s: %d images, %.4f s/image", name, count, spi)
    return timing
