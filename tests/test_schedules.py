"""CT and iCT schedules and the ct objective against hand-computed values."""
import math

import pytest
import torch

from cmpipe.cm.karras import karras_sigmas
from cmpipe.cm.losses import l2
from cmpipe.cm.schedules import (
    ct_mu,
    ct_num_scales,
    ict_num_scales,
    ict_weight,
    lognormal_index_probs,
)


def test_ct_num_scales_and_mu_at_start_middle_end():
    K, s0, s1, mu0 = 1000, 2, 150, 0.9
    assert ct_num_scales(0, K, s0, s1) == 2                     # ceil(sqrt(4) - 1) + 1
    # k = K/2: sqrt(0.5 * (151^2 - 4) + 4) = sqrt(11404.5) = 106.79...; ceil(105.79) + 1 = 107
    assert ct_num_scales(K // 2, K, s0, s1) == 107
    assert ct_num_scales(K, K, s0, s1) == 151                   # ceil(151 - 1) + 1
    # The paper: mu(k) = exp(s0 ln mu0 / N(k)).
    assert ct_mu(0, K, s0, s1, mu0, "paper") == pytest.approx(0.9)      # exp(2 ln 0.9 / 2)
    assert ct_mu(K // 2, K, s0, s1, mu0, "paper") == pytest.approx(math.exp(2 * math.log(0.9) / 107))
    assert ct_mu(K, K, s0, s1, mu0, "paper") == pytest.approx(0.9 ** (2 / 151))
    # openai's code (the default): divides by N(k) - 1.
    assert ct_mu(0, K, s0, s1, mu0) == pytest.approx(0.81)               # exp(2 ln 0.9 / 1)
    assert ct_mu(0, K, s0, s1, 0.95) == pytest.approx(0.9025)            # the example
    assert ct_mu(0, K, s0, s1, 0.95, "paper") == pytest.approx(0.95)
    assert ct_mu(K // 2, K, s0, s1, mu0) == pytest.approx(math.exp(2 * math.log(0.9) / 106))
    assert ct_mu(K, K, s0, s1, mu0) == pytest.approx(0.9 ** (2 / 150))
    with pytest.raises(ValueError, match="unknown mu"):
        ct_mu(0, K, s0, s1, mu0, "other")


def test_ict_curriculum_doubles_at_stage_boundaries():
    K = 800  # 8 stages of 100 steps for s0 = 10, s1 = 1280
    assert ict_num_scales(0, K) == 11 and ict_num_scales(99, K) == 11
    assert ict_num_scales(100, K) == 21 and ict_num_scales(199, K) == 21
    assert ict_num_scales(700, K) == 1281 and ict_num_scales(10_000, K) == 1281


def test_ict_stage_length_does_not_floor_the_logarithm():
    # K' = floor(K / (log2 floor(s1/s0) + 1)); for s0 = 10, s1 = 1000: log2(100) + 1 = 7.6439,
    # K' = floor(1000 / 7.6439) = 130 (flooring the log would give 7 stages of 142 steps).
    K, s0, s1 = 1000, 10, 1000
    assert ict_num_scales(129, K, s0, s1) == 11 and ict_num_scales(130, K, s0, s1) == 21
    assert ict_num_scales(259, K, s0, s1) == 21 and ict_num_scales(260, K, s0, s1) == 41
    assert ict_num_scales(6 * 130, K, s0, s1) == 641 and ict_num_scales(7 * 130, K, s0, s1) == 1001


def test_lognormal_index_probabilities_sum_to_one_and_follow_erf():
    s = karras_sigmas(11, 0.002, 80.0, 7.0)
    p = lognormal_index_probs(s, -1.1, 2.0)
    assert p.shape == (10,) and p.sum().item() == pytest.approx(1.0, abs=1e-6)
    cdf = lambda x: math.erf((math.log(x) + 1.1) / (math.sqrt(2) * 2.0))
    raw = [cdf(s[n].item()) - cdf(s[n + 1].item()) for n in range(10)]
    assert p[3].item() == pytest.approx(raw[3] / sum(raw), rel=1e-5)
    # most mass near exp(P_mean) = 0.33, little at the extremes
    assert p.argmax().item() in range(5, 9) and p[0] < p.max() / 5


def test_ict_weight():
    w = ict_weight(torch.tensor([2.0, 0.5]), torch.tensor([1.5, 0.25]))
    assert torch.allclose(w, torch.tensor([2.0, 4.0]))


def test_ct_loss_by_hand():
    from types import SimpleNamespace

    from cmpipe.cm.losses import ct_loss
    from cmpipe.cm.precond import ConsistencyFunction
    from cmpipe.cm.schedules import sample_pair_indices

    class Zero(torch.nn.Module):  # F = 0, so f(x, sigma) = c_skip(sigma) x
        def forward(self, x, t):
            return SimpleNamespace(sample=torch.zeros_like(x))

    f = ConsistencyFunction(Zero(), 0.5, 0.002)
    sigmas = torch.tensor([2.0, 1.0, 0.5])
    x = torch.tensor([[[[0.5, -0.5]]]])
    z = torch.tensor([[[[1.0, 2.0]]]])
    n = torch.tensor([1])
    cs = lambda s: 0.25 / ((s - 0.002) ** 2 + 0.25)
    a = [cs(1.0) * (xi + 1.0 * zi) for xi, zi in [(0.5, 1.0), (-0.5, 2.0)]]
    b = [cs(0.5) * (xi + 0.5 * zi) for xi, zi in [(0.5, 1.0), (-0.5, 2.0)]]
    want = sum((p - q) ** 2 for p, q in zip(a, b)) / 2
    assert ct_loss(f, f, x, z, n, sigmas, l2).item() == pytest.approx(want, rel=1e-5)
    # iCT weighting lambda = 1/|sigma_n - sigma_{n+1}| = 2
    assert ct_loss(f, f, x, z, n, sigmas, l2, weighting="ict").item() == pytest.approx(2 * want, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    idx = sample_pair_indices(karras_sigmas(11), 4000, g, "lognormal")
    p = lognormal_index_probs(karras_sigmas(11))
    freq = torch.bincount(idx, minlength=10).float() / 4000
    assert (freq - p).abs().max() < 0.03


def test_ct_schedule_switches():
    from cmpipe.cm.schedules import CTSchedule

    ct = CTSchedule(K=1000, num_scales="ct", mu_schedule="ct", ct_mu0=0.9)
    assert [ct.N(0), ct.N(500), ct.N(1000)] == [2, 107, 151]
    assert ct.mu_at(500) == pytest.approx(math.exp(2 * math.log(0.9) / 106))     # openai's code
    paper = CTSchedule(K=1000, num_scales="ct", mu_schedule="ct_paper", ct_mu0=0.9)
    assert paper.mu_at(500) == pytest.approx(math.exp(2 * math.log(0.9) / 107))
    ict = CTSchedule(K=800, num_scales="ict", mu_schedule="fixed", mu=0.0)
    assert [ict.N(0), ict.N(100), ict.N(799)] == [11, 21, 1281]
    assert ict.mu_at(0) == 0.0 and ict.mu_at(799) == 0.0   # iCT: theta^- = stopgrad(theta)
    with pytest.raises(ValueError, match="distill.ct_s1"):
        CTSchedule(K=10, ct_s0=5, ct_s1=5)
    with pytest.raises(ValueError, match="distill.ict_s1"):
        CTSchedule(K=10, ict_s0=20, ict_s1=10)


def test_cd_loss_ict_weighting_by_hand():
    from cmpipe.cm.karras import Sigmas
    from cmpipe.cm.losses import cd_loss

    class Scale(torch.nn.Module):  # f(x, sigma) = a x: enough to check lambda and d by hand
        def __init__(self, a):
            super().__init__()
            self.a = a

        def forward(self, x, sigma):
            return self.a * x

    sig = Sigmas(num_scales=4)
    grid = sig.grid().float()
    n = torch.tensor([0, 2])
    x_n = torch.ones(2, 1, 1, 2)                      # student: 2 * 1 = 2 on every pixel
    x_next = torch.tensor([2.0, 3.0]).reshape(2, 1, 1, 1).expand(2, 1, 1, 2)  # target: 2, then 3
    d = torch.tensor([0.0, 1.0])                        # l2 = mean over pixels of (2 - target)^2
    lam = 1 / (grid[n] - grid[n + 1]).abs()
    got = cd_loss(Scale(2.0), Scale(1.0), n, x_n, x_next, sig, l2, weighting="ict")
    assert got.item() == pytest.approx((lam * d).mean().item(), rel=1e-6)
    assert cd_loss(Scale(2.0), Scale(1.0), n, x_n, x_next, sig, l2).item() == pytest.approx(0.5)
