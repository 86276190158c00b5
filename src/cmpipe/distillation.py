"""Consistency distillation (Song et al. 2023, Algorithm 2) from cached or online teacher pairs."""
from __future__ import annotations

import copy

import torch

from .karras import Sigmas
from .losses import consistency_loss, teacher_heun_pair
from .networks import ConsistencyFunction
from .schedules import ict_weight


def student_from_teacher(teacher_net: torch.nn.Module, sig: Sigmas) -> ConsistencyFunction:
    """The student starts from the teacher's weights, with the boundary-condition scalings."""
    return ConsistencyFunction(copy.deepcopy(teacher_net).requires_grad_(True), sig.sigma_data, sig.sigma_min)


def cd_loss(student, target, n: torch.Tensor, x_n: torch.Tensor, x_next: torch.Tensor, sig: Sigmas,
            metric, huber_c: float | None = None, weighting: str = "uniform") -> torch.Tensor:
    """lambda(sigma_n) d(f_theta(x_n, sigma_n), f_theta^-(x_hat_{n+1}, sigma_{n+1})).

    weighting 'uniform' is the paper's CD (lambda = 1); 'ict' is 1 / |sigma_n - sigma_{n+1}|.
    """
    grid = sig.grid().float().to(x_n.device)
    s_n, s_next = grid[n], grid[n + 1]
    weight = ict_weight(s_n, s_next) if weighting == "ict" else None
    return consistency_loss(student, target, x_n, s_n, x_next, s_next, metric, huber_c, weight)


def cd_loss_online(student, target, teacher, x: torch.Tensor, n: torch.Tensor, z: torch.Tensor,
                   sig: Sigmas, metric, huber_c: float | None = None, weighting: str = "uniform") -> torch.Tensor:
    """The same loss with the teacher's Heun step computed in the step (no cache)."""
    grid = sig.grid().float().to(x.device)
    x_n, x_next = teacher_heun_pair(teacher, x, z, grid[n], grid[n + 1])
    return cd_loss(student, target, n, x_n, x_next, sig, metric, huber_c, weighting)
