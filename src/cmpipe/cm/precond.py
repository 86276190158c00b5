"""Preconditioning (Karras et al. 2022, Table 1; Song et al. 2023, Appendix C): the network F
wrapped as the EDM denoiser D (the teacher) or the consistency function f (the student).

Every wrapper calls F(c_in(σ) x, c_noise(σ)) with c_in = 1/√(σ² + σ_data²) and the time input
c_noise = 1000 · 0.25 · ln σ of the openai and diffusers consistency models (docs/design.md §3).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .karras import Sigmas


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """Time input of the network: 1000 * 0.25 * ln(sigma + 1e-44) (openai/diffusers CM)."""
    return 1000 * 0.25 * torch.log(sigma + 1e-44)


class Preconditioned(nn.Module):
    """out = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))."""

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def scalings(self, sigma: torch.Tensor):  # -> c_skip, c_out, c_in
        raise NotImplementedError

    @property
    def num_classes(self) -> int | None:
        return getattr(getattr(self.net, "config", None), "num_class_embeds", None)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sigma = sigma.reshape(-1).float()
        check_labels(self.num_classes, class_labels, x.shape[0])
        c_skip, c_out, c_in = (c.reshape(-1, 1, 1, 1) for c in self.scalings(sigma))
        extra = {} if class_labels is None else {"class_labels": class_labels}
        F = self.net((c_in * x).to(x.dtype), c_noise(sigma), **extra).sample
        return (c_skip * x + c_out * F.float()).to(x.dtype)

    def with_labels(self, class_labels: torch.Tensor | None) -> "Labelled | Preconditioned":
        """This model as a function of (x, sigma) alone, for the samplers and losses."""
        return self if class_labels is None else Labelled(self, class_labels)


def check_labels(num_classes: int | None, class_labels: torch.Tensor | None, batch: int):
    if num_classes is None:
        if class_labels is not None:
            raise ValueError("class labels were given to an unconditional model (its UNet has no class "
                             "embedding); train with model.class_conditional: true to use labels")
        return
    if class_labels is None:
        raise ValueError(f"this model is class-conditional ({num_classes} classes) and needs a label "
                         f"per image (class_labels)")
    # Shape only: a range check here would synchronise with the GPU on every call; labels are
    # checked where they are made (the shards' manifest, the sampler's class choice).
    if class_labels.shape != (batch,):
        raise ValueError(f"class_labels has shape {tuple(class_labels.shape)}; expected ({batch},), one "
                         f"label per image")


class Labelled:
    """A conditional model with its labels bound: called as model(x, sigma) like an unconditional one."""

    def __init__(self, model: nn.Module, class_labels: torch.Tensor):
        self.model, self.class_labels = model, class_labels

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return self.model(x, sigma, self.class_labels.to(x.device))


class EDMDenoiser(Preconditioned):
    """D(x; sigma) of EDM: c_skip = sd^2/(s^2+sd^2), c_out = s sd / sqrt(s^2+sd^2)."""

    def scalings(self, sigma):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        return c_skip, c_out, c_in


class ConsistencyFunction(Preconditioned):
    """f(x, sigma) with c_skip = sd^2/((s-eps)^2+sd^2), c_out = (s-eps) sd / sqrt(s^2+sd^2).

    At sigma = eps, c_skip = 1 and c_out = 0: the boundary condition f(x, eps) = x
    holds exactly, whatever the network outputs.
    """

    def __init__(self, net: nn.Module, sigma_data: float, sigma_min: float):
        super().__init__(net, sigma_data)
        self.sigma_min = float(sigma_min)

    def scalings(self, sigma):
        sd, eps = self.sigma_data, self.sigma_min
        c_skip = sd**2 / ((sigma - eps) ** 2 + sd**2)
        c_out = (sigma - eps) * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        return c_skip, c_out, c_in


class ECTConsistencyFunction(ConsistencyFunction):
    """ECT's student: EDM's scalings while training, the consistency function's in eval mode.

    As locuslab/ect (training/networks.py, ECMPrecond): in training the boundary is at sigma = 0
    (c_skip(0) = 1, c_out(0) = 0: f(x, 0) = x, also for t and r below sigma_min; and f starts equal
    to an EDM teacher's D); evaluation and sampling use the sigma_min boundary above.
    """

    def scalings(self, sigma):
        return EDMDenoiser.scalings(self, sigma) if self.training else super().scalings(sigma)


class DiffusersEpsTeacher(nn.Module):
    """EDM denoiser D(x; σ) = x - σ ε(x / sqrt(1 + σ²), t(σ)) from a DDPM ε-prediction UNet.

    The VP sample x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε equals x / sqrt(1 + σ_t²) for the EDM
    sample x = x_0 + σ_t ε with σ_t = sqrt((1 - ᾱ_t)/ᾱ_t). t(σ) is linear in ln σ between the
    two neighbouring levels (a float time step; UNet2DModel's sinusoidal embedding takes
    fractions), and clamped to 0 or T-1 outside [σ_0, σ_{T-1}]. Frozen and always in eval mode.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod):
        super().__init__()
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
        if ac.numel() < 2 or not bool(((ac > 0) & (ac < 1)).all()) or not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be a decreasing sequence in (0, 1) of at least 2 values")
        cfg = unet.config
        if getattr(cfg, "num_class_embeds", None) is not None or getattr(cfg, "class_embed_type", None) is not None:
            raise ValueError("the UNet is class-conditional; class-conditional teachers are not supported yet")
        if getattr(cfg, "time_embedding_type", "positional") != "positional":
            raise ValueError(f"the UNet's time_embedding_type is {cfg.time_embedding_type!r}; a DDPM "
                             f"ε-model with integer time steps (positional) is expected")
        c_in, c_out = int(cfg.in_channels), int(cfg.out_channels)
        if c_out not in (c_in, 2 * c_in):
            raise ValueError(f"the UNet has {c_in} input and {c_out} output channels; an ε-model "
                             f"outputs {c_in} (or {2 * c_in} with a learned variance)")
        self.unet = unet
        self.channels = c_in
        self.alphas_cumprod = ac  # float64 on the CPU, not a buffer: kept exactly for saving (teachers.py)
        sig = ((1 - ac) / ac).sqrt().float()  # σ_t, t = 0..T-1, increasing
        self.register_buffer("sigmas", sig, persistent=False)
        self.register_buffer("log_sigmas", sig.double().log(), persistent=False)
        self.unet.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):  # frozen teacher: always eval (dropout off)
        return super().train(False)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @property
    def num_train_timesteps(self) -> int:
        return int(self.sigmas.numel())

    # The label interface of networks.Preconditioned, so callers treat every teacher alike.
    num_classes = None

    def with_labels(self, class_labels):
        if class_labels is not None:
            raise ValueError("this DDPM ε-teacher is unconditional; it takes no class labels")
        return self

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Float time steps in [0, T-1] for σ (any shape): linear in ln σ, clamped at the ends."""
        ls_tab = self.log_sigmas
        ls = torch.as_tensor(sigma, device=ls_tab.device).to(ls_tab.dtype).clamp_min(1e-44).log()
        ls = ls.clamp(ls_tab[0], ls_tab[-1])
        i = (torch.searchsorted(ls_tab, ls.contiguous(), right=True) - 1).clamp(0, ls_tab.numel() - 2)
        lo, hi = ls_tab[i], ls_tab[i + 1]
        w = ((ls - lo) / (hi - lo)).clamp(0, 1)
        return i.to(ls_tab.dtype) + w

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        # class_labels: the signature of the EDM wrappers; a DDPM teacher here is unconditional.
        if class_labels is not None:
            raise ValueError("this DDPM ε-teacher is unconditional; it takes no class labels")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sigma = sigma.reshape(-1).float()
        t = self.timestep(sigma).float()
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        x_in = x.float() / (1 + s**2).sqrt()
        dtype = next(self.unet.parameters()).dtype
        eps = self.unet(x_in.to(dtype), t).sample[:, :self.channels].float()
        return (x.float() - s * eps).to(x.dtype)


def student_from_teacher(teacher_net: torch.nn.Module, sig: Sigmas,
                         wrapper: type[ConsistencyFunction] = ConsistencyFunction) -> ConsistencyFunction:
    """The student starts from the teacher's weights, with the boundary-condition scalings."""
    return wrapper(copy.deepcopy(teacher_net).requires_grad_(True), sig.sigma_data, sig.sigma_min)
