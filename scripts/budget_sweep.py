"""How sample quality moves with the training budget, measured on a GPU with the pipeline's own code.

The 2-core CPU of the default params affords 45k teacher images and 16k distillation images;
this script answers "what budget would meet the target" by training, with the default params'
hyperparameters (params.yaml), at several budgets:

  teacher        the EDM teacher; EMA snapshots at each budget, 500 Heun samples (35 NFE) of each;
  cd-<metric>    consistency distillation from a given teacher (its Heun pairs computed in the
                 step, as the cache would hold them), pseudo_huber / l2 / lpips;
  ct, ict        consistency training (original and improved) from random weights.

    python scripts/budget_sweep.py train --images-gz train-images-idx3-ubyte.gz \
        --teacher teacher.pt --out samples.npz --minutes 8
    python scripts/budget_sweep.py fid samples.npz          # FIDs against data/fid_ref.npz

Jobs run as parallel processes (small networks leave a GPU mostly idle). Each consistency
model is sampled like the `sample` stage (500 images, seed 3, 1 step and ts [0, 11]); every
set goes into one npz, and `fid` scores them with the protocol of `evaluate`. Runs that would
pass the deadline are stopped and reported as such.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cmpipe.pipeline.config import ct_schedule_from, sigmas_from, train_config_from  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cmpipe.cm.losses import (
    cd_loss_online,  # noqa: E402
    ct_loss,  # noqa: E402
    edm_loss,  # noqa: E402
)
from cmpipe.cm.precond import (
    ConsistencyFunction,
    EDMDenoiser,
    student_from_teacher,  # noqa: E402
)
from cmpipe.cm.sampling import default_ts  # noqa: E402
from cmpipe.cm.schedules import sample_pair_indices  # noqa: E402
from cmpipe.util.images import to_unit  # noqa: E402
from cmpipe.models.networks import build_unet, load_network, unet_config
from cmpipe.pipeline import params  # noqa: E402
from cmpipe.pipeline.config import resolve_metric  # noqa: E402
from cmpipe.sampling.sets import cm_sampler, generate, heun_sampler  # noqa: E402
from cmpipe.training.ema import Averages  # noqa: E402
from cmpipe.training.loop import Checkpoint, EpochSampler, train  # noqa: E402

ICT = dict(mode="ct", ct_num_scales="ict", mu_schedule="fixed", mu=0.0, weighting="ict",
           ct_index="lognormal", metric="pseudo_huber")
CT = dict(mode="ct", ct_num_scales="ct", mu_schedule="ct", metric="pseudo_huber")
# Worker -> runs, done in order; each run is (kind, name, images, overrides of `distill`).
WORKERS = {
    "w-teacher": [("teacher", "teacher", [45_000, 90_000, 180_000, 360_000], {})],
    "w-ct-a": [("cm", "ct_16k", 16_000, CT), ("cm", "ct_64k", 64_000, CT)],
    "w-ict-a": [("cm", "ict_16k", 16_000, ICT), ("cm", "ict_64k", 64_000, ICT)],
    "w-ct-b": [("cm", "ct_256k", 256_000, CT)],
    "w-ict-b": [("cm", "ict_256k", 256_000, ICT)],
    "w-cd-ph": [("cm", "cd_ph_48k", 48_000, {}), ("cm", "cd_ph_128k", 128_000, {})],
    "w-cd-l2": [("cm", "cd_l2_16k", 16_000, {"metric": "l2"}), ("cm", "cd_l2_48k", 48_000, {"metric": "l2"})],
    "w-cd-lpips": [("cm", "cd_lpips_16k", 16_000, {"metric": "lpips"}),
                   ("cm", "cd_lpips_48k", 48_000, {"metric": "lpips"})],
}


class Deadline(Exception):
    pass


def load_params():
    return params.load_many("model", "teacher", "distill", "diffusion", "sample", path=ROOT / "params.yaml")


def cm_sets(f, sig, s, shape, device) -> dict:
    f = f.eval()
    out = {}
    for k in s.steps:
        ts = s.ts.get(k, default_ts(k, sig.num_scales))
        out[f"nfe{k}"], _ = generate(cm_sampler(f, sig, ts, s.seed, shape), s.count, s.batch_size, shape,
                                     s.seed, device, f"cm {k} steps")
    return out


def run_teacher(budgets, images, p, sig, device, deadline) -> dict:
    t = p.teacher
    cfg_unet = unet_config(p.model.block_out_channels, p.model.layers_per_block, p.model.attention_levels,
                           p.model.dropout, images.shape[-1], images.shape[1])
    torch.manual_seed(t.seed)
    model = EDMDenoiser(build_unet(cfg_unet), sig.sigma_data).to(device)
    sampler = EpochSampler(len(images), t.batch_size, t.seed)
    snaps = {}
    steps_at = {-(-b // t.batch_size): b for b in budgets}

    cfg = train_config_from(t, "teacher", images=max(budgets), checkpoint_every=10**12, log_every=10**12)
    averages = Averages(model, cfg.ema_decays)
    ema = next(iter(averages.evaluation.values()))

    def loss_fn(step, g, target):
        if step in steps_at:
            snaps[steps_at[step]] = copy.deepcopy(ema).eval()
        if time.time() > deadline:
            raise Deadline(step)
        x = to_unit(images[sampler.indices(step)]).to(device)
        return edm_loss(model, x, t.P_mean, t.P_std, sig.sigma_data, generator=g)

    try:
        train(model, loss_fn, cfg, averages, Checkpoint(Path("/tmp/sweep-teacher.pt"), "sweep"), device)
        snaps[max(budgets)] = ema.eval()
    except Deadline as e:
        print(f"teacher stopped by the deadline at step {e}", flush=True)
    s = p.sample
    shape = tuple(images.shape[1:])
    return {f"teacher_{b // 1000}k_heun35": generate(heun_sampler(D, sig, 18), s.count, s.batch_size, shape,
                                                   s.seed, device, f"teacher {b}")[0]
            for b, D in sorted(snaps.items())}


def run_cm(name, budget, overrides, images, teacher_path, p, sig, device, deadline) -> dict:
    d = copy.copy(p.distill)
    for k, v in overrides.items():
        setattr(d, k, v)
    metric = resolve_metric(d.metric, d.lpips_net, d.lpips_resize, device, d.huber_c)
    cfg = train_config_from(d, name, images=budget, checkpoint_every=10**12, log_every=10**12)
    sched = ct_schedule_from(d, cfg.steps)
    sampler = EpochSampler(len(images), d.batch_size, d.seed)
    shape = tuple(images.shape[1:])
    if d.mode == "cd":
        net, _ = load_network(teacher_path, ("edm_teacher",))
        teacher = EDMDenoiser(copy.deepcopy(net), sig.sigma_data).to(device).eval().requires_grad_(False)
        student = student_from_teacher(net, sig).to(device)
    else:
        cfg_unet = unet_config(p.model.block_out_channels, p.model.layers_per_block, p.model.attention_levels,
                               p.model.dropout, shape[-1], shape[0])
        torch.manual_seed(d.seed)
        student = ConsistencyFunction(build_unet(cfg_unet), sig.sigma_data, sig.sigma_min).to(device)

    def loss_fn(step, g, target):
        if time.time() > deadline:
            raise Deadline(step)
        x = to_unit(images[sampler.indices(step)])
        z = torch.randn(x.shape, generator=g)
        if d.mode == "cd":
            n = torch.randint(sig.num_scales - 1, (len(x),), generator=g)
            return cd_loss_online(student, target, teacher, x.to(device), n.to(device), z.to(device),
                                  sig, metric, d.weighting)
        sigmas = sig.grid(sched.N(step))
        n = sample_pair_indices(sigmas, len(x), g, d.ct_index, d.ict_P_mean, d.ict_P_std)
        return ct_loss(student, target, x.to(device), z.to(device), n, sigmas, metric, d.weighting)

    averages = Averages(student, cfg.ema_decays, sched.mu_at)
    try:
        train(student, loss_fn, cfg, averages, Checkpoint(Path(f"/tmp/sweep-{name}.pt"), "sweep"), device)
    except Deadline as e:
        print(f"{name} stopped by the deadline at step {e} of {cfg.steps}", flush=True)
        return {}
    return {f"{name}_{k}": v for k, v in cm_sets(next(iter(averages.evaluation.values())), sig, p.sample, shape, device).items()}


def worker(name, images_gz, teacher_path, out_dir, deadline, scale=1.0):
    from cmpipe.data.sources import read_idx

    torch.backends.cuda.matmul.allow_tf32 = False  # the same float32 arithmetic as the CPU runs
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    p = load_params()
    sig = sigmas_from(p.diffusion)
    images = torch.from_numpy(read_idx(images_gz, 3)[:, None].copy())
    log = {}
    if scale != 1.0:  # a quick check of the script itself
        p.sample.count = p.sample.batch_size = 16
    for kind, run_name, budget, overrides in WORKERS[name]:
        budget = [int(b * scale) for b in budget] if kind == "teacher" else int(budget * scale)
        t0 = time.time()
        if kind == "teacher":
            sets = run_teacher(budget, images, p, sig, device, deadline)
        else:
            sets = run_cm(run_name, budget, overrides, images, teacher_path, p, sig, device, deadline)
        log[run_name] = {"seconds": time.time() - t0, "sets": sorted(sets), "budget": budget,
                         "overrides": overrides}
        print(f"{run_name}: {sorted(sets)} in {time.time() - t0:.0f} s", flush=True)
        if sets:
            np.savez(out_dir / f"{run_name}.npz", **sets)
    (out_dir / f"{name}.json").write_text(json.dumps(log, indent=1))


def train_all(args):
    out_dir = Path(args.work)
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 60 * args.minutes
    procs = [subprocess.Popen([sys.executable, __file__, "worker", name, args.images_gz, args.teacher,
                               str(out_dir), str(deadline), str(args.scale)]) for name in WORKERS]
    for proc in procs:
        proc.wait()
    sets, log = {}, {}
    for f in sorted(out_dir.glob("*.npz")):
        with np.load(f) as z:
            sets.update({k: z[k] for k in z.files})
    for f in sorted(out_dir.glob("w-*.json")):
        log.update(json.loads(f.read_text()))
    np.savez_compressed(args.out, **sets)
    Path(args.out).with_suffix(".json").write_text(json.dumps(log, indent=1))
    print(json.dumps({k: (v["seconds"], v["sets"]) for k, v in log.items()}))


def fid_all(args):
    from cmpipe.metrics import fid as evaluation

    ref = np.load(ROOT / "data/fid_ref.npz")
    model = evaluation.build_inception("cpu")
    out = {}
    with np.load(args.samples) as z:
        for name in z.files:
            feats = evaluation.inception_features(z[name], model=model, desc=name)
            out[name] = evaluation.fid_from_stats(*evaluation.feature_stats(feats), ref["mu"], ref["sigma"])
            print(f"{name}: FID {out[name]:.1f}", flush=True)
    Path(args.samples).with_suffix(".fid.json").write_text(json.dumps(out, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--images-gz", required=True, help="Fashion-MNIST train-images-idx3-ubyte.gz")
    t.add_argument("--teacher", required=True, help="a teacher model.pt of the pipeline (for cd runs)")
    t.add_argument("--out", required=True, help="npz of every sample set")
    t.add_argument("--work", default="/tmp/sweep")
    t.add_argument("--minutes", type=float, default=8.0, help="deadline for every run")
    t.add_argument("--scale", type=float, default=1.0, help="multiply every budget (a quick check: 0.002)")
    w = sub.add_parser("worker")
    for a in ("name", "images_gz", "teacher", "out_dir", "deadline", "scale"):
        w.add_argument(a)
    f = sub.add_parser("fid")
    f.add_argument("samples")
    args = ap.parse_args()
    if args.cmd == "train":
        train_all(args)
    elif args.cmd == "worker":
        worker(args.name, args.images_gz, args.teacher, Path(args.out_dir), float(args.deadline),
               float(args.scale))
    else:
        fid_all(args)


if __name__ == "__main__":
    main()
