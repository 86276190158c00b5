"""DVC stage `sample`: sample sets of the consistency model and of the teacher.

    python -m stages.sample

Reads params `sample` and `diffusion`; inputs data/student/model.pt and data/teacher/model.pt
(and data/fid_ref.npz for the ts search); outputs data/samples/<set>.npz (uint8 N×H×W×C
`images`, and `labels` for a class-conditional model), data/samples/sets.json (kind, NFE, ts,
count), reports/samples/<set>.png (first 64 images, or one row per class),
reports/ts_search.json and reports/sample_timing.json (seconds per image). With
`sample.search_ts`, the ts of 2 and more steps come from a search on the FID of
`search_count` held-out samples (`cmpipe.sampling.ts_search`), and every candidate's FID is reported;
a searched ts replaces the one of `sample.ts` only if it wins 90% of paired bootstrap resamples.
Sets: cm_nfe<k> for k in sample.steps, teacher_nfe<nfe> (Heun) for sample.teacher_heun_nfe,
teacher_euler_nfe<nfe> for sample.teacher_euler_nfe and teacher_dpm_nfe<nfe> (DPM-Solver++(2M))
for sample.teacher_dpm_nfe. All sets share initial noises; with sample.clip_denoised every
teacher denoising is clipped to [-1, 1].
"""
from __future__ import annotations

import logging
import shutil

from cmpipe.cm.karras import Sigmas, heun_nfe_to_steps
from cmpipe.cm.precond import ConsistencyFunction
from cmpipe.cm.sampling import check_ts, default_ts
from cmpipe.distributed import ddp as distributed
from cmpipe.util.images import class_rows, save_grid
from cmpipe.metrics import fid as evaluation
from cmpipe.models.networks import load_network, num_classes_of
from cmpipe.pipeline import params
from cmpipe.pipeline.config import sigmas_from
from cmpipe.pipeline.layout import (
    FID_REF,
    SAMPLE_GRIDS as GRIDS,
    SAMPLE_TIMING as TIMING,
    SAMPLES as OUT,
    STUDENT,
    TEACHER,
    TS_SEARCH as SEARCH_REPORT,
)
from cmpipe.pipeline.stage import run_stage
from cmpipe.sampling.sets import (
    class_labels,
    cm_sampler,
    dpm_sampler,
    euler_sampler,
    generate,
    heun_sampler,
)
from cmpipe.models.teachers import load_teacher
from cmpipe.sampling.ts_search import CONFIDENCE, search_ts_by_fid
from cmpipe.util.fileio import atomic_savez, atomic_write_json

log = logging.getLogger("stages.sample")


def plan_sets(s, sig: Sigmas) -> dict:
    """Validate the requested sets before any work: name -> {kind, nfe, ts | steps}."""
    sets = {}
    for k in s.steps:
        ts = s.ts.get(k, default_ts(k, sig.num_scales))
        try:
            check_ts(ts, sig.num_scales, f"sample.ts.{k}")
        except ValueError as e:
            raise params.ParamsError(str(e)) from None
        sets[f"cm_nfe{k}"] = {"kind": "cm", "nfe": k, "ts": ts}
    for nfe in s.teacher_heun_nfe:
        try:
            steps = heun_nfe_to_steps(nfe)
        except ValueError as e:
            raise params.ParamsError(str(e)) from None
        sets[f"teacher_nfe{nfe}"] = {"kind": "teacher_heun", "nfe": nfe, "steps": steps}
    for key, kind in (("teacher_euler_nfe", "teacher_euler"), ("teacher_dpm_nfe", "teacher_dpm")):
        for nfe in getattr(s, key):
            if nfe < 1:
                raise params.ParamsError(f"sample.{key}: NFE must be at least 1, got {nfe}")
            sets[f"{key}{nfe}"] = {"kind": kind, "nfe": nfe}
    return sets


def main():
    p = params.load_many("sample", "diffusion")
    s, sig = p.sample, sigmas_from(p.diffusion)
    sets = plan_sets(s, sig)
    dist = distributed.init(s.device)
    device = dist.device(s.device)
    student_net, ckpt = load_network(STUDENT, ("consistency",), which="ema")
    f = ConsistencyFunction(student_net, sig.sigma_data, sig.sigma_min).to(device).eval()
    D = load_teacher(TEACHER, sig.sigma_data, device)
    u = ckpt["unet"]
    shape = (u["in_channels"], u["sample_size"], u["sample_size"])
    num_classes = num_classes_of(u)
    if D.num_classes != num_classes:
        raise params.ParamsError(f"the student {STUDENT} ({num_classes or 'no'} classes) and the teacher "
                                 f"{TEACHER} ({D.num_classes or 'no'} classes) disagree on class conditioning; "
                                 f"run `dvc repro` to retrain them with the same model.class_conditional")
    try:
        labels = class_labels(num_classes, s.seed, s.class_label)
    except ValueError as e:
        raise params.ParamsError(f"sample.class_label: {e}") from None
    # How the consistency model was made, carried into the reports' table.
    made_by = {k: ckpt["meta"][k] for k in ("mode", "metric", "weighting") if k in ckpt["meta"]}

    search = {"search_ts": s.search_ts}
    if s.search_ts:
        search_steps = max(s.steps)
        if search_steps < 2:
            raise params.ParamsError("sample.search_ts needs a step count of 2 or more in sample.steps")
        if s.search_seed == s.seed:
            raise params.ParamsError("sample.search_seed must differ from sample.seed: the search's samples "
                                     "are held out from the evaluated sets")
        ref = evaluation.load_reference(FID_REF)
        # The ts given in params start the refinement and stay unless the search's ts beats them
        # with confidence (paired bootstrap of the search's samples).
        start = {k: s.ts.get(k, default_ts(k, sig.num_scales)) for k in range(2, search_steps + 1)}
        chosen, fids, win_rates = search_ts_by_fid(f, sig, shape, search_steps, s.search_count, s.search_seed,
                                        s.batch_size, device, ref, s.search_method, start=start,
                                        labels=class_labels(num_classes, s.search_seed, s.class_label),
                                        dist=dist)
        for k, ts in chosen.items():
            if f"cm_nfe{k}" in sets:
                sets[f"cm_nfe{k}"]["ts"] = ts
                sets[f"cm_nfe{k}"]["ts_searched"] = True
        search.update(method=s.search_method, count=s.search_count, seed=s.search_seed,
                      chosen={str(k): ts for k, ts in chosen.items()}, fid=fids,
                      confidence=CONFIDENCE, win_rate={str(k): v for k, v in win_rates.items()},
                      params_ts={str(k): s.ts.get(k, default_ts(k, sig.num_scales)) for k in chosen})
        log.info("searched ts: %s", chosen)

    for d in (OUT, GRIDS):
        if d.exists() and dist.is_main:
            shutil.rmtree(d)
    timing = {}
    for name, info in sets.items():
        if info["kind"] == "cm":
            sampler = cm_sampler(f, sig, info["ts"], s.seed, shape, labels)
            info["model"] = made_by
        elif info["kind"] == "teacher_heun":
            sampler = heun_sampler(D, sig, info["steps"], labels, s.clip_denoised)
        elif info["kind"] == "teacher_euler":
            sampler = euler_sampler(D, sig, info["nfe"], labels, s.clip_denoised)
        else:
            sampler = dpm_sampler(D, sig, info["nfe"], labels, s.clip_denoised)
        images, spi = generate(sampler, s.count, s.batch_size, shape, s.seed, device, name, dist=dist)
        if not dist.is_main:  # its batches went to rank 0, which writes the set
            continue
        if labels is None:
            atomic_savez(OUT / f"{name}.npz", images=images)
            save_grid(images[:64], GRIDS / f"{name}.png", nrow=8)
        else:  # the classes of the set beside its images; the grid has one row per class
            y = labels(range(s.count)).numpy()
            atomic_savez(OUT / f"{name}.npz", images=images, labels=y)
            save_grid(class_rows(images, y, num_classes), GRIDS / f"{name}.png", nrow=8)
            info.update(classes=num_classes, class_label=s.class_label)
        info.update(count=s.count, device=device.type)
        timing[name] = {"seconds_per_image": spi, "device": device.type}
        log.info("%s: %d images, %.4f s/image", name, s.count, spi)
    # Wall-clock times apart from the sets, so that data/samples is the same for the same inputs.
    if dist.is_main:
        atomic_write_json(OUT / "sets.json", sets)
        atomic_write_json(TIMING, timing)
        atomic_write_json(SEARCH_REPORT, search)


if __name__ == "__main__":
    run_stage("sample", main)
