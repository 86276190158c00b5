"""The formulas of docs/design.md §3 against hand-computed values."""
import math
from types import SimpleNamespace

import pytest
import torch

from cmpipe.cm.karras import (
    Sigmas,
    euler_step,
    heun_nfe_to_steps,
    heun_step,
    karras_sigmas,
    sample_euler,
    sample_heun,
)
from cmpipe.cm.losses import (
    PseudoHuber,
    consistency_loss,
    edm_loss,
    l1,
    l2,
    pixel_distance,
    pseudo_huber_c,
)
from cmpipe.cm.precond import ConsistencyFunction, EDMDenoiser, c_noise
from cmpipe.cm.sampling import consistency_sample, default_ts
from cmpipe.models.networks import build_unet, unet_config


class Linear(torch.nn.Module):
    """A stand-in for the UNet: F(x, t) = a x + b (records its inputs), for hand computations."""

    def __init__(self, a=0.0, b=0.0):
        super().__init__()
        self.a, self.b = a, b
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        return SimpleNamespace(sample=self.a * x + self.b + 0 * self.w)


def test_karras_grid_end_points_monotone_and_formula():
    s = karras_sigmas(18, 0.002, 80.0, 7.0)
    assert s[0].item() == 80.0 and s[-1].item() == 0.002
    assert torch.all(s[1:] < s[:-1])
    # sigma_i = (smax^(1/rho) + i/(N-1)(smin^(1/rho) - smax^(1/rho)))^rho at i = 9 by hand
    i = 9
    hand = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(hand, rel=1e-12)
    assert s[9].item() == pytest.approx(1.9233, abs=1e-4) and s[11].item() == pytest.approx(0.5853, abs=1e-4)
    with pytest.raises(ValueError):
        karras_sigmas(1)


def test_edm_scalings_by_hand():
    net = Linear(a=0.0, b=1.0)  # F = 1 everywhere
    D = EDMDenoiser(net, sigma_data=0.5)
    x = torch.full((1, 1, 2, 2), 2.0)
    out = D(x, torch.tensor([1.0]))
    c_skip = 0.25 / (1 + 0.25)
    c_out = 1.0 * 0.5 / math.sqrt(1.25)
    assert out.flatten()[0].item() == pytest.approx(c_skip * 2 + c_out * 1, rel=1e-6)
    x_in, t = net.calls[-1]
    assert x_in.flatten()[0].item() == pytest.approx(2 / math.sqrt(1.25), rel=1e-6)  # c_in has the sqrt
    assert t.item() == pytest.approx(250 * math.log(1.0), abs=1e-6)
    assert c_noise(torch.tensor([80.0])).item() == pytest.approx(250 * math.log(80.0), rel=1e-6)


def test_consistency_scalings_and_boundary_condition_exact():
    net = Linear(a=3.0, b=-7.0)
    f = ConsistencyFunction(net, sigma_data=0.5, sigma_min=0.002)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(f(x, torch.full((4,), 0.002)), x)  # f(x, eps) = x exactly
    sigma = 2.0
    out = f(torch.ones(1, 1, 1, 1), torch.tensor([sigma]))
    c_skip = 0.25 / ((sigma - 0.002) ** 2 + 0.25)
    c_out = (sigma - 0.002) * 0.5 / math.sqrt(sigma**2 + 0.25)
    c_in = 1 / math.sqrt(sigma**2 + 0.25)
    assert out.item() == pytest.approx(c_skip + c_out * (3 * c_in - 7), rel=1e-6)


def test_boundary_condition_with_real_unet():
    cfg = unet_config([16, 32], 1, [], 0.0, 8, 1)
    f = ConsistencyFunction(build_unet(cfg), 0.5, 0.002)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(f(x, torch.tensor([0.002, 0.002])), x)


@pytest.mark.parametrize("s", [0.5, 1.3])
def test_heun_sampler_matches_exact_ode_for_gaussian_data(s):
    # Data N(0, s^2 I): D(x; sigma) = x s^2/(s^2 + sigma^2), and the PF-ODE maps x at sigma_0 to
    # x sqrt(s^2 + sigma^2)/sqrt(s^2 + sigma_0^2). Over EDM's 18-point grid (35 NFE) the relative
    # error of the final sample stays under 8% (the steps near sigma ~ s dominate: up to 2% each),
    # and Heun is second order: 4x the steps cut it by more than 10x.
    sig = Sigmas()
    D = lambda x, sigma: x * s**2 / (s**2 + sigma.reshape(-1, 1, 1, 1) ** 2)
    z = torch.randn(16, 1, 4, 4, dtype=torch.float64)
    out = sample_heun(D, z, sig, 18)
    exact = z * 80.0 * s / math.sqrt(s**2 + 80.0**2)
    rel = ((out - exact).norm() / exact.norm()).item()
    assert rel < 0.08
    rel4 = ((sample_heun(D, z, sig, 72) - exact).norm() / exact.norm()).item()
    assert rel4 < rel / 10
    # and each grid step agrees with the exact flow to the same order
    grid = sig.grid(18)
    x = z * 80.0
    for a, b in zip(grid[:-1], grid[1:]):
        x_exact = x * math.sqrt(s**2 + b**2) / math.sqrt(s**2 + a**2)
        x = heun_step(D, x, a, b)
        assert ((x - x_exact).norm() / x_exact.norm()).item() < 0.025
        x = x_exact
    # Euler with one step is the denoiser's guess D(sigma_max z; sigma_max)
    e1 = sample_euler(D, z, sig, 1)
    assert torch.allclose(e1, D(z * 80.0, torch.tensor([80.0], dtype=torch.float64)))
    assert euler_step(D, z, 1.0, 0.5).shape == z.shape


def test_heun_nfe():
    assert heun_nfe_to_steps(35) == 18
    assert heun_nfe_to_steps(1) == 1
    with pytest.raises(ValueError, match="odd"):
        heun_nfe_to_steps(10)


def test_pseudo_huber_c_and_distances():
    assert pseudo_huber_c(1 * 28 * 28) == pytest.approx(0.00054 * 28, rel=1e-12)
    assert pseudo_huber_c(3 * 32 * 32) == pytest.approx(0.00054 * math.sqrt(3072), rel=1e-12)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    y = torch.zeros_like(x)
    assert l2(x, y).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    assert l1(x, y).item() == pytest.approx(10 / 4)
    c = pseudo_huber_c(4)
    assert PseudoHuber()(x, y).item() == pytest.approx(math.sqrt(30 + c**2) - c, rel=1e-6)
    assert pixel_distance("pseudo_huber", huber_c=1.0)(x, y).item() == pytest.approx(math.sqrt(31) - 1, rel=1e-6)
    with pytest.raises(ValueError, match="unknown distance 'lpips2'"):
        pixel_distance("lpips2")


def test_consistency_loss_by_hand():
    # F = 0, so f(x, sigma) = c_skip(sigma) x; the loss is d(c_skip(s_n) x_n, c_skip(s_n1) x_n1).
    student = ConsistencyFunction(Linear(), 0.5, 0.002)
    target = ConsistencyFunction(Linear(), 0.5, 0.002)
    x_n = torch.tensor([[[[1.0, -1.0]]], [[[0.5, 0.0]]]])
    x_next = torch.tensor([[[[0.5, -0.5]]], [[[0.25, 0.5]]]])
    s_n, s_next = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0])
    cs = lambda s: 0.25 / ((s - 0.002) ** 2 + 0.25)
    per = []
    for b in range(2):
        a = [cs(s_n[b].item()) * v for v in x_n[b].flatten().tolist()]
        t = [cs(s_next[b].item()) * v for v in x_next[b].flatten().tolist()]
        per.append(sum((p - q) ** 2 for p, q in zip(a, t)) / 2)
    loss = consistency_loss(student, target, x_n, s_n, x_next, s_next, l2)
    assert loss.item() == pytest.approx(sum(per) / 2, rel=1e-5)
    w = torch.tensor([2.0, 0.0])
    assert consistency_loss(student, target, x_n, s_n, x_next, s_next, l2, weight=w).item() == \
        pytest.approx(per[0], rel=1e-5)


def test_consistency_loss_has_no_gradient_through_target():
    net_s, net_t = Linear(a=1.0), Linear(a=1.0)
    student = ConsistencyFunction(net_s, 0.5, 0.002)
    target = ConsistencyFunction(net_t, 0.5, 0.002)
    x = torch.randn(3, 1, 2, 2)
    loss = consistency_loss(student, target, x, torch.full((3,), 1.0), x, torch.full((3,), 0.5), l2)
    loss.backward()
    assert net_t.w.grad is None


def test_edm_loss_weight_by_hand():
    # With F = 0 and x = 0, D(x + n; sigma) = c_skip (sigma n): the loss is lambda c_skip^2 sigma^2 E[n^2].
    D = EDMDenoiser(Linear(), 0.5)
    g1 = torch.Generator().manual_seed(0)
    loss = edm_loss(D, torch.zeros(1, 1, 1, 1), -1.2, 1.2, 0.5, generator=g1)
    g2 = torch.Generator().manual_seed(0)
    sigma = math.exp(torch.randn(1, generator=g2).item() * 1.2 - 1.2)
    n = torch.randn(1, 1, 1, 1, generator=g2).item() * sigma
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    c_skip = 0.25 / (sigma**2 + 0.25)
    assert loss.item() == pytest.approx(lam * (c_skip * n) ** 2, rel=1e-5)


def test_multistep_consistency_sampling_by_hand():
    sig = Sigmas()
    grid = sig.grid()
    f = lambda x, s: x * 0.1  # a toy consistency function
    z0, z1 = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0)
    out = consistency_sample(f, z0, sig, [0, 11], lambda k: z1)
    x0 = min(max(80.0 * 0.1, -1), 1)  # clipped to [-1, 1]
    x = x0 + math.sqrt(grid[11].item() ** 2 - 0.002**2) * 2.0
    assert out.item() == pytest.approx(min(max(x * 0.1, -1), 1), rel=1e-6)
    assert default_ts(1, 18) == [0]
    assert default_ts(2, 18)[0] == 0 and len(default_ts(3, 18)) == 3
