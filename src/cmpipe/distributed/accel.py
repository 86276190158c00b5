"""GPU speed settings of the training stages (params `accel`): bf16 autocast, TF32, channels-last
and torch.compile. All of them act on CUDA only; on a CPU the training path is unchanged (the
committed CPU results do not depend on these keys).

* bf16 autocast: matmuls and convolutions in bfloat16 with float32 weights, optimizer and EMA;
  bf16 has float32's exponent range, so no loss scaling is needed.
* TF32: float32 matmuls and convolutions on tensor cores (Ampere and later), 10-bit mantissa
  products with float32 accumulation; safe for training at these learning rates.
* channels-last: NHWC weights and activations, the layout tensor-core convolutions want.
* torch.compile: the UNet compiled once (the first steps are slow); off by default.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Accel:
    bf16: bool = False
    tf32: bool = False
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def from_params(cls, a, device: torch.device) -> "Accel":
        if device.type != "cuda":
            return cls()  # the CPU path is the plain float32 one, whatever the params say
        return cls(a.bf16, a.tf32, a.channels_last, a.compile)

    def configure(self):
        """Process-wide switches (TF32, cuDNN autotuning); call once before building models."""
        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each convolution once

    def autocast(self):
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
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
