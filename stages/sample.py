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
Sets are named `<sampler>_nfe<NFE>` (`cmpipe.sampling.plan`): cm_nfe<k> for k in sample.steps,
teacher_heun_nfe<nfe> for sample.teacher_heun_nfe, teacher_euler_nfe<nfe> for sample.teacher_euler_nfe
and teacher_dpm_nfe<nfe> (DPM-Solver++(2M)) for sample.teacher_dpm_nfe. All sets share initial
noises; with sample.clip_denoised every teacher denoising is clipped to [-1, 1].
"""
from __future__ import annotations

import shutil

from cmpipe.cm.precond import ConsistencyFunction
from cmpipe.distributed import ddp as distributed
from cmpipe.models.networks import load_network, num_classes_of
from cmpipe.models.teachers import load_teacher
from cmpipe.pipeline import params
from cmpipe.pipeline.config import sigmas_from
from cmpipe.pipeline.layout import (
    FID_REF,
    SAMPLE_GRIDS as GRIDS,
    SAMPLE_SETS,
    SAMPLE_TIMING as TIMING,
    SAMPLES as OUT,
    STUDENT,
    TEACHER,
    TS_SEARCH as SEARCH_REPORT,
)
from cmpipe.pipeline.stage import run_stage
from cmpipe.sampling.plan import SetSamplers, plan_sets, sample_sets, search_cm_ts
from cmpipe.sampling.sets import class_labels
from cmpipe.util.fileio import atomic_write_json


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
        labels, search_labels = (class_labels(num_classes, seed, s.class_label) for seed in (s.seed, s.search_seed))
    except ValueError as e:
        raise params.ParamsError(f"sample.class_label: {e}") from None
    # How the consistency model was made, carried into the reports' table.
    made_by = {k: ckpt["meta"][k] for k in ("init", "mode", "metric", "weighting") if k in ckpt["meta"]}
    search = search_cm_ts(sets, s, sig, f, shape, device, FID_REF, search_labels, dist, parts_dir=OUT)
    for info in sets.values():
        if info["kind"] == "cm":
            info["model"] = made_by
    for d in (OUT, GRIDS):
        if d.exists() and dist.is_main:
            shutil.rmtree(d)
    samplers = SetSamplers(f, D, sig, shape, s.seed, labels, s.clip_denoised)
    timing = sample_sets(sets, samplers, s.count, s.batch_size, device, dist, OUT, GRIDS, num_classes, s.class_label)
    # Wall-clock times apart from the sets, so that data/samples is the same for the same inputs.
    if dist.is_main:
        atomic_write_json(SAMPLE_SETS, sets)
        atomic_write_json(TIMING, timing)
        atomic_write_json(SEARCH_REPORT, search)


if __name__ == "__main__":
    run_stage("sample", main)
