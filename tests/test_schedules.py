"""CT and iCT schedules against hand-computed values (for the coming ct mode)."""
import math

import pytest
import torch

from cmpipe.karras import karras_sigmas
from cmpipe.schedules import ct_mu, ct_num_scales, ict_num_scales, ict_weight, lognormal_index_probs


def test_ct_num_scales_and_mu_at_start_middle_end():
    K, s0, s1, mu0 = 1000, 2, 150, 0.9
    assert ct_num_scales(0, K, s0, s1) == 2                     # ceil(sqrt(4) - 1) + 1
    # k = K/2: sqrt(0.5 * (151^2 - 4) + 4) = sqrt(11404.5) = 106.79...; ceil(105.79) + 1 = 107
    assert ct_num_scales(K // 2, K, s0, s1) == 107
    assert ct_num_scales(K, K, s0, s1) == 151                   # ceil(151 - 1) + 1
    assert ct_mu(0, K, s0, s1, mu0) == pytest.approx(0.9)      # exp(2 ln 0.9 / 2)
    assert ct_mu(K // 2, K, s0, s1, mu0) == pytest.approx(math.exp(2 * math.log(0.9) / 107))
    assert ct_mu(K, K, s0, s1, mu0) == pytest.approx(0.9 ** (2 / 151))


def test_ict_curriculum_doubles_at_stage_boundaries():
    K = 800  # 8 stages of 100 steps for s0 = 10, s1 = 1280
    assert ict_num_scales(0, K) == 11 and ict_num_scales(99, K) == 11
    assert ict_num_scales(100, K) == 21 and ict_num_scales(199, K) == 21
    assert ict_num_scales(700, K) == 1281 and ict_num_scales(10_000, K) == 1281


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
