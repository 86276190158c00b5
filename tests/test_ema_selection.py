"""Several evaluation EMAs: their names, the params that list them, and the choice by held-out FID."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cmpipe.training.selection import best_ema, heldout_fids
from cmpipe.errors import ParamsError
from cmpipe.metrics import fid as evaluation
from cmpipe.pipeline import params
from cmpipe.distributed.ddp import SINGLE
from cmpipe.pipeline.training_stage import TrainingStage
from cmpipe.training.ema import ema_names
from cmpipe.training.selection import CURVE, SELECTION, choose_ema


def test_one_decay_keeps_the_name_ema_and_several_are_named_by_decay():
    assert ema_names([0.99]) == {"ema": 0.99}
    assert ema_names([0.99, 0.999, 0.9999432189950708]) == {"ema_0.99": 0.99, "ema_0.999": 0.999,
                                                            "ema_0.999943": 0.9999432189950708}
    with pytest.raises(ValueError, match="lists a decay twice"):
        ema_names([0.9999432, 0.99994321])


def test_params_ema_decays_is_a_list_and_the_old_key_names_the_new_one():
    section = params.read_params()["distill"]
    assert params.validate_section("distill", section).ema_decays == [float(x) for x in section["ema_decays"]]
    old = {k: v for k, v in section.items() if k != "ema_decays"} | {"ema_decay": 0.99}
    with pytest.raises(ParamsError, match=r"distill.ema_decay was renamed to distill.ema_decays"):
        params.validate_section("distill", old)
    for bad, words in (([], "non-empty list"), (0.99, "non-empty list"), ([0.5, 1.0], "above its maximum"),
                       ([-0.1], "below its minimum"), (["a"], "non-empty list of numbers")):
        with pytest.raises(ParamsError, match=words):
            params.validate_section("distill", section | {"ema_decays": bad})


def check_heldout_fid(section, name, ref):
    report = ref.parent / name
    report.mkdir(exist_ok=True)
    TrainingStage(name, section, ref.parent / "model.pt", report, ref.parent / "resume.pt", SINGLE, ref).check()
    assert not report.exists()  # an earlier run's report goes once the checks pass


def test_scoring_needs_the_reference_before_any_training(tmp_path):
    ref = tmp_path / "fid_ref.npz"
    with pytest.raises(ParamsError, match=r"distill.ema_decays lists 2 EMAs.*dvc repro fid_ref"):
        check_heldout_fid(SimpleNamespace(ema_decays=[0.99, 0.999], heldout_fid_every=None), "distill", ref)
    with pytest.raises(ParamsError, match=r"teacher.heldout_fid_every is set.*dvc repro fid_ref"):
        check_heldout_fid(SimpleNamespace(ema_decays=[0.99], heldout_fid_every=100), "teacher", ref)
    with pytest.raises(ParamsError, match="lists a decay twice"):
        check_heldout_fid(SimpleNamespace(ema_decays=[0.5, 0.5], heldout_fid_every=None), "teacher", ref)
    check_heldout_fid(SimpleNamespace(ema_decays=[0.99], heldout_fid_every=None), "distill", ref)  # no scoring


def test_one_unscored_decay_is_used_as_it_is(tmp_path):
    section = SimpleNamespace(ema_decays=[0.99], heldout_fid_every=None)
    best, record = choose_ema(ema_names(section.ema_decays), [{"images": 64, "loss": 1.0}], tmp_path)
    assert best == "ema" and record["fid"] == {} and record["chosen_decay"] == 0.99
    assert json.loads((tmp_path / SELECTION).read_text())["chosen"] == "ema"
    assert not (tmp_path / CURVE).exists()


def test_the_last_scores_choose_and_every_scored_row_is_on_the_curve(tmp_path):
    section = SimpleNamespace(ema_decays=[0.9, 0.99], heldout_fid_every=64, heldout_fid_count=10,
                              heldout_fid_seed=3)
    history = [{"images": 64, "loss": 1.0, "heldout_fid/ema_0.9": 200.0, "heldout_fid/ema_0.99": 250.0},
               {"images": 96, "loss": 0.9},
               {"images": 128, "loss": 0.8, "heldout_fid/ema_0.9": 190.0, "heldout_fid/ema_0.99": 180.5}]
    best, record = choose_ema(ema_names(section.ema_decays), history, tmp_path, section.heldout_fid_count,
                              section.heldout_fid_seed)
    assert best == "ema_0.99" and record["chosen_decay"] == 0.99 and record["images"] == 128
    assert record["fid"] == {"ema_0.9": 190.0, "ema_0.99": 180.5}
    assert (tmp_path / CURVE).read_text().splitlines() == [
        "images,ema,decay,fid", "64,ema_0.9,0.9,200", "64,ema_0.99,0.99,250",
        "128,ema_0.9,0.9,190", "128,ema_0.99,0.99,180.5"]
    assert best_ema({"a": float("nan"), "b": 3.0, "c": 3.0}) == "b"
    with pytest.raises(FloatingPointError, match="diverged"):
        best_ema({"a": float("nan")})


def _blobs(noise: torch.Tensor) -> torch.Tensor:
    """Smooth images in [-1, 1] made from noise: the 'data' of this test."""
    return torch.tanh(2 * torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2))


def test_the_held_out_fid_ranks_samples_like_the_reference_first(tmp_path):
    torch.manual_seed(0)
    real = ((_blobs(torch.randn(40, 1, 28, 28)) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    model = evaluation.build_inception("cpu")
    feats = evaluation.inception_features(real.permute(0, 2, 3, 1).numpy(), model=model, progress=False)
    mu, sigma = evaluation.feature_stats(feats)
    samplers = {"ema_0.9": lambda noise, idx: torch.zeros_like(noise),  # a grey mean image
                "ema_0.99": lambda noise, idx: _blobs(noise)}
    fids = heldout_fids(samplers, 12, 6, (1, 28, 28), 5, torch.device("cpu"), {"mu": mu, "sigma": sigma},
                        inception=model)
    assert best_ema(fids) == "ema_0.99" and fids["ema_0.99"] < fids["ema_0.9"]
    assert all(np.isfinite(v) for v in fids.values())
    # the same seed gives the same FIDs (common random numbers across candidates and runs)
    assert heldout_fids(samplers, 12, 6, (1, 28, 28), 5, torch.device("cpu"), {"mu": mu, "sigma": sigma},
                        inception=model) == fids
