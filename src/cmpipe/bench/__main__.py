"""Command line of the benchmarks: `python -m cmpipe.bench <name>` prints one JSON line."""
from __future__ import annotations

import argparse
import json
import sys

from cmpipe.bench import distill_step, loader, sampling, scaling, trajectories

DESCRIPTION = """Benchmarks that print one JSON line each: `python -m cmpipe.bench <name>`.

Every line has the measured figures, their ratio to the benchmark's limit, the device, the
threads and the peak memory (RSS, and torch.cuda.max_memory_allocated on a GPU). The two sides of
a ratio are measured in the same run, alternating, so that the machine's noise hits both alike.
Networks are randomly initialised from the params' `model` section at 28x28x1: the point is
throughput, which the weights do not change.

loader: decoded images per second of the streaming shard loader (`cmpipe.bench.streaming`:
webdataset, --workers DataLoader processes) against the images per second a teacher training
step consumes at the same batch; the loader must never be the bottleneck (ratio >= 10).

trajectories: cache pairs per second (`trajectories.pair_batch`, as the stage computes them)
against the teacher's raw forward throughput divided by the 2 evaluations of a Heun step
(ratio >= 0.8 of that limit).

sampling: images per second of the consistency model at 1 and 2 steps against the teacher's
Heun sampler at 35 NFE; the limit of each ratio is the ratio of evaluations (35 and 17.5).

scaling: global images per second of the cached CD step in 1 process and in 2 processes with
DDP (gloo on the CPU, NCCL on 2 GPUs); the limit of the ratio is 2 (efficiency = ratio / 2).

distill-step: in one process and on the same batch, a CD step that reads cached
teacher pairs against a CD step that runs the teacher's Heun step online
(2 teacher evaluations more per step). Steps alternate between the two kinds so
that the machine's noise hits both alike; the ratio is what to compare.
`--metric` picks the distance (l2, l1, pseudo_huber, lpips); `--compare-metrics`
adds cached steps with each of l2, pseudo_huber and lpips, alternating in the same
run, and their cost per step relative to l2: what LPIPS costs.
"""
METRICS = ["l2", "l1", "pseudo_huber", "lpips"]
DEVICES = ["auto", "cpu", "cuda"]
PARAMS_HELP = "params file whose `model` section is benchmarked"


def _resize(v: str) -> int | None:
    return None if v == "none" else int(v)


def _common(sp, steps: int, batch_help: str):
    sp.add_argument("--batch-size", type=int, default=None, help=f"default: the params' {batch_help}")
    sp.add_argument("--steps", type=int, default=steps, help="timed rounds (default %(default)s)")
    sp.add_argument("--params", default="params.yaml", help=PARAMS_HELP)
    sp.add_argument("--device", default="auto", choices=DEVICES)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cmpipe.bench", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="name", required=True)
    d = sub.add_parser("distill-step", help="cached vs online-teacher CD step")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--steps", type=int, default=10)
    d.add_argument("--metric", default="pseudo_huber", choices=METRICS)
    d.add_argument("--lpips-resize", type=_resize, default=224,
                   help="LPIPS input size (distill.lpips_resize); 'none' keeps the image size")
    d.add_argument("--compare-metrics", action="store_true",
                   help="also time cached steps with l2, pseudo_huber and lpips, alternating")
    d.add_argument("--params", default="params.yaml", help=PARAMS_HELP)
    d.add_argument("--device", default="auto", choices=DEVICES)

    lo = sub.add_parser("loader", help="streaming shard loader vs a teacher training step's consumption")
    _common(lo, 5, "teacher.batch_size")
    lo.add_argument("--shards", nargs="+", default=None,
                    help="shard files, or a manifest.json (its train split); default data/shards/manifest.json")
    lo.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    lo.add_argument("--shuffle-buffer", type=int, default=1000, help="samples per worker's shuffle buffer")
    lo.add_argument("--loader-batches", type=int, default=200, help="batches per timed loader pass")

    tr = sub.add_parser("trajectories", help="cache pairs/s vs the teacher's forward throughput / 2")
    _common(tr, 3, "trajectories.batch_size")
    tr.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast on CUDA (default: trajectories.bf16)")

    sa = sub.add_parser("sampling", help="consistency model at 1 and 2 steps vs the teacher at 35 NFE")
    _common(sa, 2, "sample.batch_size")
    sa.add_argument("--teacher-nfe", type=int, default=35, help="Heun NFE of the teacher (odd)")

    sc = sub.add_parser("scaling", help="cached CD step in 1 and 2 processes (DDP)")
    _common(sc, 5, "distill.batch_size")
    sc.add_argument("--metric", default="pseudo_huber", choices=METRICS)
    sc.add_argument("--lpips-resize", type=_resize, default=224)
    sc.add_argument("--threads", type=int, default=None,
                    help="CPU threads of each process (default: half of torch's default)")
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.name == "distill-step":
        out = distill_step(a.batch_size, a.steps, a.metric, a.params, a.device, a.lpips_resize,
                           a.compare_metrics)
    elif a.name == "loader":
        out = loader(a.batch_size, a.steps, a.params, a.device, a.shards, a.workers, a.shuffle_buffer,
                     a.loader_batches)
    elif a.name == "trajectories":
        out = trajectories(a.batch_size, a.steps, a.params, a.device, a.bf16)
    elif a.name == "sampling":
        out = sampling(a.batch_size, a.steps, a.params, a.device, a.teacher_nfe)
    else:
        out = scaling(a.batch_size, a.steps, a.params, a.device, a.metric, a.threads, a.lpips_resize)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
