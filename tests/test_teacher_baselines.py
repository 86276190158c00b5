"""The teacher's baselines (issue 13): Euler's grid, DPM-Solver++ through diffusers' scheduler,
clip_denoised at every step, the sample stage's DPM sets, and the summary's NFE-to-match."""
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from cmpipe.cm.karras import Sigmas, sample_euler
from cmpipe.pipeline.params import ParamsError
from cmpipe.pipeline.report import match_markdown, teacher_nfe_to_match
from cmpipe.sampling.sets import dpm_sampler, euler_sampler, heun_sampler, sample_dpm_solver

SIG = Sigmas()


def recording(denoise):
    """`denoise` that records each call's (x, sigma)."""
    calls = []

    def d(x, sigma):
        calls.append((x.clone(), sigma.clone()))
        return denoise(x, sigma)
    return d, calls


def gaussian(x, sigma, s=0.5):  # D of N(0, s^2 I) data, exact
    return x * s**2 / (s**2 + sigma.reshape(-1, 1, 1, 1) ** 2)


@pytest.mark.parametrize("nfe", [1, 2, 3, 4])
def test_dpm_solver_single_point_data_and_nfe(nfe):
    # Data = one point x*: D(x; sigma) = x* exactly, and every consistent solver returns x*.
    x_star = torch.tensor([-0.7, 0.1, 0.9], dtype=torch.float64).reshape(1, 3, 1, 1)
    D, calls = recording(lambda x, sigma: x_star.expand_as(x))
    z = torch.randn(4, 3, 1, 1, dtype=torch.float64)
    out = sample_dpm_solver(D, z, SIG, nfe)
    assert torch.allclose(out, x_star.expand_as(out), atol=1e-5)
    assert len(calls) == nfe
    # from EDM's x = sigma_max z along the (nfe + 1)-point Karras grid without sigma_min (then 0,
    # not evaluated), as the Euler baseline
    assert torch.equal(calls[0][0], z * SIG.sigma_max)
    sigmas = torch.stack([c[1][0] for c in calls])
    assert torch.allclose(sigmas, SIG.grid(nfe + 1)[:-1], rtol=1e-5)
    assert SIG.sigma_min not in sigmas.tolist()


def test_dpm_solver_one_step_is_the_denoisers_guess():
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    guess = gaussian(z * SIG.sigma_max, torch.tensor([SIG.sigma_max], dtype=torch.float64))
    assert torch.allclose(sample_dpm_solver(gaussian, z, SIG, 1), guess, atol=1e-6)
    assert torch.allclose(sample_euler(gaussian, z, SIG, 1), guess)
    with pytest.raises(ValueError, match="nfe >= 1"):
        sample_dpm_solver(gaussian, z, SIG, 0)


def dpmpp_2m(denoise, x, sigmas):
    """k-diffusion's `sample_dpmpp_2m` (Lu et al. 2022, DPM-Solver++(2M)) in lambda = -log sigma, a first-order
    step into sigma = 0; an independent reference for the scheduler's steps."""
    old = None
    for i, (s, s_next) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
        d = denoise(x, torch.full((len(x),), s, dtype=x.dtype))
        if s_next == 0:
            return d
        h = math.log(s / s_next)
        if old is not None:
            r = math.log(sigmas[i - 1].item() / s) / h
            d, old = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * old, d
        else:
            old = d
        x = s_next / s * x - math.expm1(-h) * d
    return x


@pytest.mark.parametrize("nfe", [2, 3, 6])
def test_dpm_solver_matches_k_diffusion_dpmpp_2m(nfe):
    z = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    sigmas = torch.cat([SIG.grid(nfe + 1)[:-1], torch.zeros(1, dtype=torch.float64)])
    assert torch.allclose(sample_dpm_solver(gaussian, z, SIG, nfe), dpmpp_2m(gaussian, z * SIG.sigma_max, sigmas),
                          atol=1e-5)


def test_euler_grid_skips_sigma_min():
    z = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    D, calls = recording(gaussian)
    sample_euler(D, z, SIG, 2)
    sigmas = [c[1][0].item() for c in calls]
    assert sigmas == pytest.approx([SIG.sigma_max, SIG.grid(3)[1].item()])
    assert 2.4 < sigmas[1] < 2.6 and SIG.sigma_min not in sigmas
    D, calls = recording(gaussian)
    sample_euler(D, z, SIG, 1)
    assert [c[1][0].item() for c in calls] == [SIG.sigma_max]


@pytest.mark.parametrize("make", [lambda D, clip: heun_sampler(D, SIG, 3, clip_denoised=clip),
                                  lambda D, clip: euler_sampler(D, SIG, 3, clip_denoised=clip),
                                  lambda D, clip: dpm_sampler(D, SIG, 4, clip_denoised=clip)],
                         ids=["heun", "euler", "dpm"])
@pytest.mark.parametrize("clip", [True, False])
def test_clip_denoised_at_every_step(make, clip):
    # A denoiser that overshoots: the constant 3 x*, outside [-1, 1] in two channels. With a constant
    # estimate c, Euler, Heun and DPM-Solver++ all follow x(sigma) = c + sigma / sigma_max (sigma_max z - c),
    # so the input of every call tells which c the solver was given: clip(3 x*) under clip_denoised.
    x_star = torch.tensor([-0.5, 0.2, 0.5], dtype=torch.float64).reshape(1, 3, 1, 1)
    D, calls = recording(lambda x, sigma: (3 * x_star).expand_as(x))
    z = torch.randn(2, 3, 1, 1, dtype=torch.float64)
    out = make(D, clip)(z, [0, 1])
    c = (3 * x_star).clamp(-1, 1) if clip else 3 * x_star
    assert len(calls) >= 3
    for x, sigma in calls:
        assert torch.allclose(x, c + sigma[0] / SIG.sigma_max * (SIG.sigma_max * z - c), atol=1e-4)
    assert torch.allclose(out, (3 * x_star).clamp(-1, 1).expand_as(out), atol=1e-5)  # the final clamp stays


def test_plan_sets_names_dpm_sets_and_checks_nfe():
    from cmpipe.sampling.plan import plan_sets

    s = SimpleNamespace(steps=[1], ts={}, teacher_heun_nfe=[], teacher_euler_nfe=[2], teacher_dpm_nfe=[2, 5])
    sets = plan_sets(s, SIG)
    assert sets["teacher_dpm_nfe5"] == {"kind": "teacher_dpm", "nfe": 5}
    assert list(sets) == ["cm_nfe1", "teacher_euler_nfe2", "teacher_dpm_nfe2", "teacher_dpm_nfe5"]
    with pytest.raises(ParamsError, match="teacher_dpm_nfe"):
        plan_sets(SimpleNamespace(**{**vars(s), "teacher_dpm_nfe": [0]}), SIG)


def test_teacher_nfe_to_match_on_a_hand_made_table():
    rows = [("cm_nfe1", "cm", 1, 30.0), ("cm_nfe2", "cm", 2, 12.0),
            ("teacher_dpm_nfe2", "teacher_dpm", 2, 80.0), ("teacher_dpm_nfe4", "teacher_dpm", 4, 20.0),
            ("teacher_dpm_nfe8", "teacher_dpm", 8, 10.0),
            ("teacher_euler_nfe1", "teacher_euler", 1, 300.0), ("teacher_euler_nfe2", "teacher_euler", 2, 250.0),
            ("teacher_heun_nfe35", "teacher_heun", 35, 5.0), ("teacher_heun_nfe79", "teacher_heun", 79, None)]
    table = pd.DataFrame(rows, columns=["set", "sampler", "NFE", "FID"])
    m = {(r["cm_nfe"], r["sampler"]): r for r in teacher_nfe_to_match(table)}
    assert len(m) == 6
    # cm 1 step (30): DPM 2 -> 80, 4 -> 20: NFE 4, and FID crosses 30 at 2^(1 + 50/60) NFE
    assert m[1, "teacher_dpm"]["nfe"] == 4 and m[1, "teacher_dpm"]["bracket"] == (2, 4)
    assert m[1, "teacher_dpm"]["interpolated_nfe"] == pytest.approx(2 ** (1 + 50 / 60))
    # cm 2 steps (12): 4 -> 20, 8 -> 10: NFE 8, crossing at 2^(2 + 0.8)
    assert m[2, "teacher_dpm"]["nfe"] == 8 and m[2, "teacher_dpm"]["interpolated_nfe"] == pytest.approx(2 ** 2.8)
    # a match at the smallest evaluated NFE has nothing to interpolate from; the set without FID is left out
    assert m[1, "teacher_heun"]["nfe"] == 35 and m[1, "teacher_heun"]["interpolated_nfe"] is None
    assert m[1, "teacher_heun"]["best_nfe"] == 35
    assert m[2, "teacher_euler"]["nfe"] is None
    assert (m[2, "teacher_euler"]["best_fid"], m[2, "teacher_euler"]["best_nfe"]) == (250.0, 2)
    text = "\n".join(match_markdown(teacher_nfe_to_match(table)))
    assert "none of the evaluated NFE (best: 250 at NFE 2)" in text
    assert "6.96 (between NFE 4 and 8)" in text
    assert match_markdown(teacher_nfe_to_match(table[table["sampler"] != "cm"])) == []


def test_summary_states_the_teacher_nfe_to_match(tmp_path):
    from cmpipe.pipeline.report import summary_markdown

    sets = {"cm_nfe1": {"kind": "cm", "nfe": 1, "ts": [0]}, "teacher_dpm_nfe2": {"kind": "teacher_dpm", "nfe": 2},
            "teacher_dpm_nfe4": {"kind": "teacher_dpm", "nfe": 4}}
    metrics = {"fid": {"cm_nfe1": 30.0, "teacher_dpm_nfe2": 80.0, "teacher_dpm_nfe4": 20.0}, "kid": {}}
    text = summary_markdown(metrics, sets, tmp_path, tmp_path)
    assert "## Teacher NFE to match the consistency model" in text
    assert "| 1 step (FID 30)" in text and "3.56 (between NFE 2 and 4)" in text
