"""Whole teacher trajectories by DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), the data of
Consistency Mid-Training (CMT; Hu et al. 2026, section 3: x_hat_{t_M} = x_T, ..., x_hat_{t_0}).

The solver is diffusers' `EDMDPMSolverMultistepScheduler`, driven as `sampling.sets.sample_dpm_solver`
drives it (same settings, same conversion of the EDM denoiser's output), but on a grid of noise
levels given by the caller, and keeping every point.
"""
from __future__ import annotations

import torch

from cmpipe.cm.karras import Denoise, Sigmas
from cmpipe.cm.precond import EDMDenoiser


def check_sigma_grid(sigmas, name: str = "sigmas") -> torch.Tensor:
    """`sigmas` as a float32 CPU tensor if it is a strictly decreasing 1-D grid of at least two
    finite levels, all positive but the last (which may be 0); else a ValueError naming it."""
    s = torch.as_tensor(sigmas)
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"{name} must be a 1-D grid of at least 2 noise levels, got shape {tuple(s.shape)}")
    s = s.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name} holds a non-finite noise level: {s.tolist()}")
    if not bool((s[1:] < s[:-1]).all()):
        raise ValueError(f"{name} must be strictly decreasing (index 0 = sigma_max), got {s.tolist()}")
    if not bool((s[:-1] > 0).all()) or float(s[-1]) < 0:
        raise ValueError(f"{name} must be positive (only its last level may be 0), got {s.tolist()}")
    return s


@torch.no_grad()
def dpm_solver_trajectory(denoise: Denoise, noise: torch.Tensor, sigmas, sigma_data: float = 0.5,
                          x_start: torch.Tensor | None = None) -> torch.Tensor:
    """Every point of DPM-Solver++(2M)'s trajectory from x = sigmas[0] * noise down the grid `sigmas`.

    Returns B x P x C x H x W with P = len(sigmas): point 0 is the start, point i the state after
    step i at sigmas[i] (P - 1 evaluations of `denoise`, the EDM denoiser D(x; sigma)). Each D is
    handed to the scheduler as the epsilon-type output (D - c_skip x) / c_out that its
    `precondition_outputs` maps back to D. Second order multistep (dpmsolver++), the first step
    first order (no history) and the last step first order (the scheduler's final_sigmas_type
    'zero' rule, kept whether the grid ends at 0 or at sigma_min). `x_start` replaces the start
    sigmas[0] * noise: sample_dpm_solver starts at sigma_max z = 80 z on a float32 Karras grid whose
    first level is 79.99998; with x_start = 80 z on that grid the last point is its sample exactly.
    """
    from diffusers import EDMDPMSolverMultistepScheduler

    grid = check_sigma_grid(sigmas)
    if not isinstance(noise, torch.Tensor) or noise.ndim < 2 or noise.shape[0] == 0:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a batch B x ... with B >= 1, got {shape}")
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be positive, got {sigma_data}")
    nfe = grid.numel() - 1
    sched = EDMDPMSolverMultistepScheduler(
        sigma_data=sigma_data, sigma_schedule="karras", solver_order=2, algorithm_type="dpmsolver++",
        final_sigmas_type="zero", prediction_type="epsilon")
    sched.set_timesteps(nfe, device=noise.device)  # resets the solver's history; the grid is ours:
    sched.sigmas = grid  # on the CPU, as set_timesteps leaves it
    sched.timesteps = sched.precondition_noise(grid[:-1]).to(noise.device)  # one per evaluation
    sched.num_inference_steps = nfe
    sched.set_begin_index(0)  # step i starts at grid point i, whatever the (float) timesteps
    edm = EDMDenoiser(torch.nn.Identity(), sigma_data)  # for its scalings c_skip, c_out only
    x = noise * grid[0].item() if x_start is None else x_start
    if x.shape != noise.shape:
        raise ValueError(f"x_start has shape {tuple(x.shape)}, noise {tuple(noise.shape)}")
    points = [x]
    for i, t in enumerate(sched.timesteps):
        s = float(grid[i])
        d = denoise(x, torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device))
        c_skip, c_out, _ = (float(c) for c in edm.scalings(torch.tensor(s, dtype=torch.float64)))
        x = sched.step((d - c_skip * x) / c_out, t, x).prev_sample
        points.append(x)
    return torch.stack(points, dim=1)


def karras_grid_to_zero(sig: Sigmas, nfe: int) -> torch.Tensor:
    """The grid of the DPM-Solver++ and Euler baselines: the scheduler's (nfe + 1)-point Karras grid
    with sigma_min replaced by 0, so that no evaluation is spent at sigma_min (the scheduler's own
    nfe-point grid then 0 would make 2 NFE 80 -> 0.002 -> 0, in effect one step)."""
    from diffusers import EDMDPMSolverMultistepScheduler

    if nfe < 1:
        raise ValueError(f"DPM-Solver++ needs nfe >= 1, got {nfe}")
    sched = EDMDPMSolverMultistepScheduler(sigma_min=sig.sigma_min, sigma_max=sig.sigma_max,
                                           sigma_data=sig.sigma_data, rho=sig.rho, sigma_schedule="karras")
    sched.set_timesteps(nfe + 1)
    return torch.cat([sched.sigmas[:nfe], sched.sigmas[-1:]])
