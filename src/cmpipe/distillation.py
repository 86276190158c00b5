"""Consistency distillation (Song et al. 2023, Algorithm 2) from cached or online teacher pairs."""
from __future__ import annotations

import copy

import torch

from .karras import Sigmas
from .losses import consistency_loss, teacher_heun_pair
from .networks import ConsistencyFunction


def student_from_teacher(teacher_net: torch.nn.Module, sig: Sigmas) -> ConsistencyFunction:
    """The student starts from the teacher's weights, with the boundary-condition scalings."""
    return ConsistencyFunction(copy.deepcopy(teacher_net).requires_grad_(True), sig.sigma_data, sig.sigma_min)


def cd_loss(student, target, n: torch.Tensor, x_n: torch.Tensor, x_next: torch.Tensor, sig: Sigmas,
            metric: str, huber_c: float | None = None) -> torch.Tensor:
    """d(f_theta(x_n, sigma_n), f_theta^-(x_hat_{n+1}, sigma_{n+1})) with lambda = 1 (the paper's CD)."""
    grid = sig.grid().float().to(x_n.device)
    return consistency_loss(student, target, x_n, grid[n], x_next, grid[n + 1], metric, huber_c)


def cd_loss_online(student, target, teacher, x: torch.Tensor, n: torch.Tensor, z: torch.Tensor,
                   sig: Sigmas, metric: str, huber_c: float | None = None) -> torch.Tensor:
    """The same loss with the teacher's Heun step computed in the step (no cache)."""
    grid = sig.grid().float().to(x.device)
    x_n, x_next = teacher_heun_pair(teacher, x, z, grid[n], grid[n + 1])
    return cd_loss(student, target, n, x_n, x_next, sig, metric, huber_c)
