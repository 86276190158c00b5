"""Several processes (and nodes) through PyTorch's own engine: torchrun and DDP.

A stage started by torchrun finds RANK, WORLD_SIZE and LOCAL_RANK in its environment;
`init()` joins the process group (NCCL on GPUs, gloo on CPUs) and returns a `Dist`. Without
them, `init()` returns the one-process `Dist` and nothing distributed is touched: the plain
single-process path is unchanged.

The rules that make N processes give exactly the output of one:

* Training splits the *global* batch of step k into equal contiguous parts, one per rank
  (`Dist.part`). Every rank draws the global batch's randomness from the step's generator and
  keeps its part, so sample j of the batch sees the same noise whatever the world size; the
  loss is a mean over the part and DDP averages the gradients, which is the mean over the
  global batch.
* Work made of independent items (trajectory pairs, samples, features) is cut into the same
  batches as one process would use; batch b goes to rank b mod W, and rank 0 writes them in
  order. Each item's randomness derives from the seed and its global index.
* Rank 0 alone writes reports and checkpoints.
"""
from __future__ import annotations

import datetime
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def part(self, batch_size: int) -> slice:
        """This rank's rows of a global batch (equal parts: batch_size % world == 0)."""
        if batch_size % self.world:
            raise ValueError(f"the global batch of {batch_size} does not split into {self.world} equal "
                             f"parts (one per process): choose a batch size divisible by {self.world}")
        n = batch_size // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def my_batches(self, num_batches: int) -> range:
        """The batches of an item-parallel job this rank computes: b = rank, rank + W, ..."""
        return range(self.rank, num_batches, self.world)

    def device(self, name: str = "auto") -> torch.device:
        from cmpipe.distributed.device import pick_device

        dev = pick_device(name)
        if dev.type == "cuda" and self.enabled:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return dev


SINGLE = Dist()


def init(device: str = "auto") -> Dist:
    """Join the torchrun process group if this process was started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch.distributed as td

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if not td.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        # A long timeout: rank 0 may write a large cache while the others wait at a barrier.
        td.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return Dist(rank, world, local, backend)


def barrier(d: Dist):
    if d.enabled:
        import torch.distributed as td

        td.barrier()


def broadcast_object(d: Dist, obj):
    """Rank 0's `obj` on every rank (small objects: settings, chosen ts)."""
    if not d.enabled:
        return obj
    import torch.distributed as td

    box = [obj if d.is_main else None]
    td.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(d: Dist, t: torch.Tensor) -> torch.Tensor:
    if not d.enabled:
        return t
    import torch.distributed as td

    t = t.clone()
    td.all_reduce(t)
    return t / d.world


def shutdown():
    """Leave the process group, if this process joined one (run_stage does it at the end)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


# --- DDP around the UNet of a preconditioned wrapper --------------------------------------
# DDP wraps the raw network (`model.net`), so the wrappers' scalings, their `with_labels`
# and every loss keep calling the model as before, and the gradients are averaged in backward.

def wrap_ddp(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if not hasattr(model, "net"):
        raise TypeError("wrap_ddp expects a preconditioned wrapper with a .net (networks.Preconditioned)")
    dev = next(model.net.parameters()).device
    model.net = DistributedDataParallel(model.net, device_ids=[dev.index] if dev.type == "cuda" else None,
                                        gradient_as_bucket_view=True)
    return model


def unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(getattr(model, "net", None), DistributedDataParallel):
        model.net = model.net.module
    return model


def plain_state_dict(model: torch.nn.Module) -> dict:
    """The state dict of `model` as if its network were wrapped in neither DDP nor torch.compile
    (checkpoints resume with any number of processes, compiled or not)."""
    def plain(k: str) -> str:
        for wrapper in ("_orig_mod.", "module."):
            if k.startswith("net." + wrapper):
                k = "net." + k[len("net." + wrapper):]
        return k
    return {plain(k): v for k, v in model.state_dict().items()}


# --- item-parallel jobs: each rank's batches, written in order by rank 0 ---------------------

class PartsDir:
    """A shared temporary folder where each rank leaves its batches and rank 0 reads them in order.

    Ranks on one node share the folder beside `out`; across nodes it must be on a shared file
    system (as the outputs are). Pickle is used only for these files, which this job wrote
    moments ago into its own folder.
    """

    def __init__(self, d: Dist, out: Path, name: str):
        self.d = d
        base = Path(out).parent
        base.mkdir(parents=True, exist_ok=True)
        path = str(Path(tempfile.mkdtemp(prefix=f".{name}.parts.", dir=base))) if d.is_main else None
        self.path = Path(broadcast_object(d, path))

    def put(self, batch: int, obj):
        tmp = self.path / f"{batch:09d}.tmp{self.d.rank}"
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, self.path / f"{batch:09d}.pkl")

    def get(self, batch: int):
        with open(self.path / f"{batch:09d}.pkl", "rb") as f:
            return pickle.load(f)

    def close(self):
        barrier(self.d)
        if self.d.is_main:
            shutil.rmtree(self.path, ignore_errors=True)


def gather_in_order(d: Dist, num_batches: int, compute, out: Path, name: str):
    """Yield compute(b) for b = 0..num_batches-1, in order, on rank 0; each rank computes its own
    batches (`Dist.my_batches`). Every rank must exhaust the iterator (the others get nothing)."""
    if not d.enabled:
        for b in range(num_batches):
            yield compute(b)
        return
    parts = PartsDir(d, out, name)
    try:
        for b in d.my_batches(num_batches):
            parts.put(b, compute(b))
        barrier(d)
        if d.is_main:
            for b in range(num_batches):
                yield parts.get(b)
    finally:
        parts.close()
