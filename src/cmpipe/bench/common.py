"""What the benchmarks share: timing, rates, peak memory, and the networks built from the params."""
from __future__ import annotations

import resource
import time

import torch

from cmpipe.cm.precond import EDMDenoiser
from cmpipe.distributed.device import fast_cpu_defaults
from cmpipe.models.networks import build_unet, unet_config
from cmpipe.pipeline import params as params_mod
from cmpipe.pipeline.config import sigmas_from


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(dev) -> dict:
    """Peak memory of this process: RSS in MB, and the CUDA allocator's peak on a GPU."""
    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if dev.type == "cuda":
        out["cuda_max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return out


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, barrier=None) -> float:
    """Seconds `fn()` takes, the device's queued work included, and then `barrier()` if given (the
    wait for the other ranks)."""
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    if barrier is not None:
        barrier()
    return time.perf_counter() - t0


def rate(images: int, seconds: float) -> float:
    return images / max(seconds, 1e-12)


def rounded(v: float, nd: int = 3) -> float:
    return round(float(v), nd)


def unet(p, dev):
    """The params' UNet at 28x28x1, randomly initialised (seed 0)."""
    torch.manual_seed(0)
    return build_unet(unet_config(p.model.block_out_channels, p.model.layers_per_block,
                                  p.model.attention_levels, p.model.dropout, 28, 1)).to(dev)


def setup(dev, params_file: str, *sections: str):
    """(params, Sigmas, UNet on `dev`) of a benchmark: the `model`, `diffusion` and `sections` of
    the params file, after the CPU defaults."""
    fast_cpu_defaults()
    p = params_mod.load_many("model", "diffusion", *sections, path=params_file)
    sig = sigmas_from(p.diffusion)
    return p, sig, unet(p, dev)


def frozen_teacher(net, sig):
    """The teacher denoiser around `net`, in eval mode and without gradients."""
    return EDMDenoiser(net, sig.sigma_data).eval().requires_grad_(False)
