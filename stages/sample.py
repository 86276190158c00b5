"""DVC stage `sample`: sample sets of the consistency model and of the teacher.

    python -m stages.sample

Reads params `sample` and `diffusion`; inputs data/student/model.pt and data/teacher/model.pt;
outputs data/samples/<set>.npz (uint8 N×H×W×C `images`), data/samples/sets.json (kind,
NFE, ts, count, seconds per image) and reports/samples/<set>.png (first 64 images).
Sets: cm_nfe<k> for k in sample.steps, teacher_nfe<nfe> (Heun) for sample.teacher_heun_nfe
and teacher_euler_nfe<nfe> for sample.teacher_euler_nfe. All sets share initial noises.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from cmpipe import params
from cmpipe.fileio import atomic_savez, atomic_write_json
from cmpipe.images import save_grid
from cmpipe.karras import Sigmas, heun_nfe_to_steps
from cmpipe.networks import ConsistencyFunction, EDMDenoiser, load_network
from cmpipe.sampling import check_ts, cm_sampler, default_ts, euler_sampler, generate, heun_sampler
from cmpipe.stage import run_stage
from cmpipe.training import pick_device

STUDENT = Path("data/student/model.pt")
TEACHER = Path("data/teacher/model.pt")
OUT = Path("data/samples")
GRIDS = Path("reports/samples")
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
    for nfe in s.teacher_euler_nfe:
        sets[f"teacher_euler_nfe{nfe}"] = {"kind": "teacher_euler", "nfe": nfe}
    return sets


def main():
    p = params.load_many("sample", "diffusion")
    s, sig = p.sample, Sigmas.from_params(p.diffusion)
    sets = plan_sets(s, sig)
    device = pick_device(s.device)
    student_net, ckpt = load_network(STUDENT, ("consistency",), which="ema")
    teacher_net, _ = load_network(TEACHER, ("edm_teacher",), which="ema")
    f = ConsistencyFunction(student_net, sig.sigma_data, sig.sigma_min).to(device).eval()
    D = EDMDenoiser(teacher_net, sig.sigma_data).to(device).eval()
    u = ckpt["unet"]
    shape = (u["in_channels"], u["sample_size"], u["sample_size"])
    # How the consistency model was made, carried into the reports' table.
    made_by = {k: ckpt["meta"][k] for k in ("mode", "metric", "weighting") if k in ckpt["meta"]}

    for d in (OUT, GRIDS):
        if d.exists():
            shutil.rmtree(d)
    for name, info in sets.items():
        if info["kind"] == "cm":
            sampler = cm_sampler(f, sig, info["ts"], s.seed, shape)
            info["model"] = made_by
        elif info["kind"] == "teacher_heun":
            sampler = heun_sampler(D, sig, info["steps"])
        else:
            sampler = euler_sampler(D, sig, info["nfe"])
        images, spi = generate(sampler, s.count, s.batch_size, shape, s.seed, device, name)
        atomic_savez(OUT / f"{name}.npz", images=images)
        save_grid(images[:64], GRIDS / f"{name}.png", nrow=8)
        info.update(count=s.count, seconds_per_image=spi, device=device.type)
        log.info("%s: %d images, %.4f s/image", name, s.count, spi)
    atomic_write_json(OUT / "sets.json", sets)


if __name__ == "__main__":
    run_stage("sample", main)
