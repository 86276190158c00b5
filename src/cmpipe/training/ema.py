"""The averaged copies of the weights that a training run keeps, in one place.

Consistency models keep two kinds (Song et al. 2023, §5): the evaluation EMAs, fixed decays whose
weights sampling uses (the official runs keep several, `--ema_rate 0.999,0.9999,...`, and pick
one afterwards), and in CD and CT the target network θ⁻ of the loss, whose rate μ(k) may follow a
schedule (Algorithm 3). All of them move right after optimizer step k, as openai's
`_update_ema` and `_update_target_ema` do, so step k+1's loss sees the θ⁻ of θ after step k.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float):
    """ema <- decay ema + (1 - decay) model; buffers are copied."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def ema_name(decay: float) -> str:
    """The weights' name of the EMA with `decay` in a saved model, e.g. 'ema_0.999'."""
    return f"ema_{decay:g}"


def ema_names(decays: list[float]) -> dict[str, float]:
    """{name: decay} of the evaluation EMAs; one decay keeps the plain name 'ema'."""
    if len(decays) == 1:
        return {"ema": float(decays[0])}
    names = {ema_name(d): float(d) for d in decays}
    if len(names) != len(decays):
        raise ValueError(f"ema_decays = {decays} lists a decay twice (names are 'ema_<decay>' with 6 "
                         f"significant digits)")
    return names


TARGET = "target"  # the name of θ⁻ in checkpoints and model files


class Averages:
    """The evaluation EMAs of `model` ({name: decay}) and, when `target_rate` (step -> μ) is given,
    the target θ⁻. The target runs in training mode like the student (openai's
    `target_model.train()`), so that with dropout it sees the student's mask."""

    def __init__(self, model: nn.Module, decays: dict[str, float],
                 target_rate: Callable[[int], float] | None = None):
        if TARGET in decays:
            raise ValueError(f"an evaluation EMA cannot be named {TARGET!r}: that is θ⁻")
        self.decays, self.target_rate = dict(decays), target_rate
        self.evaluation = {n: copy.deepcopy(model).requires_grad_(False) for n in self.decays}
        self.target = copy.deepcopy(model).requires_grad_(False).train() if target_rate else None

    def update(self, model: nn.Module, step: int):
        """After optimizer step `step` (0-based): each EMA with its decay, θ⁻ with μ(step)."""
        for name, decay in self.decays.items():
            ema_update(self.evaluation[name], model, decay)
        if self.target is not None:
            ema_update(self.target, model, self.target_rate(step))

    def modules(self) -> dict[str, nn.Module]:
        return {**self.evaluation, **({TARGET: self.target} if self.target is not None else {})}

    def state_dict(self, state_of: Callable[[nn.Module], dict]) -> dict:
        return {name: state_of(m) for name, m in self.modules().items()}

    def load_state_dict(self, states: dict):
        mine = self.modules()
        if set(states) != set(mine):
            raise KeyError(f"the checkpoint holds averages {sorted(states)}, this run keeps {sorted(mine)}")
        for name, sd in states.items():
            mine[name].load_state_dict(sd)
