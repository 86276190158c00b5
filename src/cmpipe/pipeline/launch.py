"""Run a heavy stage in one process, or under torchrun when params ask for more.

    python -m cmpipe.pipeline.launch stages.distill   # the dvc.yaml command of the heavy stages

Reads params `dist` (nproc_per_node, nnodes, rdzv_endpoint, rdzv_id). With one process in all
it runs `python -m <stage>` itself: the plain path, unchanged. Otherwise it becomes
`torchrun` (PyTorch's `torch.distributed.run`): `--standalone` on one node, a c10d rendezvous
at `rdzv_endpoint` across nodes, where the same command runs on every node (see the README
for Slurm). The stage's output does not depend on the number of processes.
"""
from __future__ import annotations

import importlib.util
import os
import sys

from cmpipe.pipeline import params


def command(module: str, d) -> list[str]:
    """The command that runs stage `module` with the processes of params `dist` (`d`)."""
    if not module.startswith("stages.") or importlib.util.find_spec(module) is None:
        raise params.ParamsError(f"cmpipe.pipeline.launch runs a stage module stages.<name>, not {module!r}")
    if d.nproc_per_node * d.nnodes == 1:
        return [sys.executable, "-m", module]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={d.nproc_per_node}",
           f"--nnodes={d.nnodes}"]
    if d.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={d.rdzv_endpoint}", f"--rdzv_id={d.rdzv_id}"]
    return cmd + ["-m", module]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m cmpipe.pipeline.launch stages.<stage>")
    try:
        cmd = command(argv[0], params.load("dist"))
    except params.ParamsError as e:
        raise SystemExit(f"launch: {e}")
    if cmd[1:3] != ["-m", argv[0]]:
        print("launch:", " ".join(cmd[2:]), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
