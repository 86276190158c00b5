"""GPU speed settings of the training stages (params `accel`): bf16 autocast, TF32, channels-last
and torch.compile.

`Accel.from_params` is the stages' policy: on CUDA every switch the params turn on acts (compile
only where torch.compile can build kernels, i.e. Triton is installed); on a CPU the training path
is the plain float32 one whatever the params say, so the committed CPU results do not depend on
these keys. A switch that is on but cannot act is never dropped silently: the stage's log says so
once, naming the keys ("accel.bf16 is on but has no effect on cpu (CUDA only; the CPU path is plain
float32); set accel.bf16: false to silence this").

`Accel` itself works on the device the loop runs on, so the code paths run on a CPU too (the
tests do: tests/test_accel.py): autocast on the device's own type (CPU bf16 autocast uses
oneDNN's bf16 kernels), channels-last weights, and torch.compile through inductor's C++ backend.

* bf16 autocast: matmuls and convolutions in bfloat16 with float32 weights, optimizer and EMA;
  bf16 has float32's exponent range, so no loss scaling is needed.
* TF32: float32 matmuls and convolutions on tensor cores (Ampere and later), 10-bit mantissa
  products with float32 accumulation; safe for training at these learning rates. CUDA only.
* channels-last: NHWC weights and activations, the layout tensor-core convolutions want.
* torch.compile: the UNet compiled once (the first steps are slow); off by default.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, fields

import torch

_log = logging.getLogger(__name__)


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile (inductor) cannot build kernels for `device` on this machine, or None
    when it can: Triton on CUDA, a working C++ compiler on a CPU."""
    try:
        if device.type == "cuda":
            from torch.utils._triton import has_triton

            return None if has_triton() else "Triton is not installed or does not support this GPU"
        if device.type == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()  # runs `<compiler> --version`; raises when none works
            return None
    except Exception as e:  # noqa: BLE001 - any failure of the probe means no compiler
        return f"no working compiler for inductor ({type(e).__name__}: {e})"
    return f"inductor has no backend for {device.type}"


@dataclass(frozen=True)
class Accel:
    bf16: bool = False
    tf32: bool = False
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def from_params(cls, a, device: torch.device, log: logging.Logger | None = None,
                    announce: bool = True) -> Accel:
        """The switches of params section `a` that act on `device`: all of them on CUDA (compile
        where it can be built), none on a CPU. Those that are on but dropped are logged once
        through `log` (the stage's logger) when `announce` (rank 0 under torchrun)."""
        asked = {f.name: bool(getattr(a, f.name)) for f in fields(cls)}
        on = [k for k, v in asked.items() if v]
        if device.type != "cuda":
            accel, idle, detail = cls(), on, "CUDA only; the CPU path is plain float32"
        else:
            accel, idle, detail = cls(**asked), [], ""
            if accel.compile and (reason := compile_unavailable(device)):
                accel, idle = cls(**dict(asked, compile=False)), ["compile"]
                detail = f"torch.compile cannot build kernels here: {reason}; the UNet runs uncompiled"
        if idle and announce:
            one = len(idle) == 1
            (log or _log).warning("%s %s on but %s no effect on %s (%s); set %s to silence this",
                                  ", ".join(f"accel.{k}" for k in idle), "is" if one else "are",
                                  "has" if one else "have", device.type, detail,
                                  ", ".join(f"accel.{k}: false" for k in idle))
        return accel

    def configure(self):
        """Process-wide switches (TF32, cuDNN autotuning); call once before building models."""
        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each convolution once

    def autocast(self, device: torch.device | str):
        """bf16 autocast on `device`'s own type (cuda, cpu, ...), or nothing."""
        if self.bf16:
            return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_layout(self, model: torch.nn.Module) -> torch.nn.Module:
        """channels-last weights (before DDP wraps the network: it holds views of the gradients)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def compile_net(self, model: torch.nn.Module) -> torch.nn.Module:
        """torch.compile of `model.net` (after DDP, so that DDP's optimiser sees the graph)."""
        if self.compile:
            model.net = torch.compile(model.net)
        return model


PLAIN = Accel()


def uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module torch.compile wrapped, or `module` itself."""
    return getattr(module, "_orig_mod", module)


def resident(t: torch.Tensor, device: torch.device, max_fraction: float = 0.25) -> torch.Tensor:
    """An in-memory training array where batches are cheapest to take from: on the GPU itself when
    it fits in `max_fraction` of the GPU's memory (no host copies in the loop), else page-locked
    host memory; unchanged on a CPU. Index it with indices on `t.device`."""
    if device.type != "cuda":
        return t
    if t.numel() * t.element_size() <= max_fraction * torch.cuda.get_device_properties(device).total_memory:
        return t.to(device)
    return t.pin_memory()
