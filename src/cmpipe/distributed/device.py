"""The device a stage runs on, and the CPU settings every stage starts with."""
from __future__ import annotations

import torch


def fast_cpu_defaults():
    # Denormal floats made the first CPU steps ~9x slower (docs/design.md §4).
    torch.set_flush_denormal(True)


def pick_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for (a *.device param) but no CUDA GPU is "
                           "visible; set it to auto or cpu")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
