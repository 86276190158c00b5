"""The training loop: resume after an interruption equals an uninterrupted run, bit for bit."""
import logging
import math
from pathlib import Path

import pytest
import torch

from cmpipe.pipeline.config import train_config_from
from cmpipe.training.loop import EpochSampler, TrainConfig, ema_names, ema_update, train
from cmpipe.util.fileio import atomic_save
from cmpipe.util.seeding import seeded_generator

DATA = torch.randn(40, 3)
REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def config(**kw):
    base = dict(images=80, batch_size=4, lr=0.01, warmup_images=8, grad_clip=1.0,
                ema_decays={"ema": 0.9, "target": 0.5}, checkpoint_every=16, log_every=8, seed=3,
                name="teacher")
    base.update(kw)
    return TrainConfig(**base)


def loss_fn_for(model, sampler, stop_at=None):
    def loss_fn(step, g, emas):
        if step == stop_at:
            raise KeyboardInterrupt  # a kill between two checkpoints
        x = DATA[sampler.indices(step)]
        noise = torch.randn(x.shape[0], 1, generator=g)  # per-step randomness from (seed, step)
        return ((model(x) - x.sum(1, keepdim=True) - noise) ** 2).mean()
    return loss_fn


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = config()
    m1 = make()
    e1 = train(m1, loss_fn_for(m1, EpochSampler(40, 4, 3)), cfg, tmp_path / "a.pt", None, "fp", torch.device("cpu"))

    m2 = make()
    with pytest.raises(KeyboardInterrupt):
        train(m2, loss_fn_for(m2, EpochSampler(40, 4, 3), stop_at=11), cfg, tmp_path / "b.pt", None, "fp",
              torch.device("cpu"))
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 8  # the last checkpoint
    m3 = make()  # a fresh process: new model, resumes from the checkpoint
    e3 = train(m3, loss_fn_for(m3, EpochSampler(40, 4, 3)), cfg, tmp_path / "b.pt", None, "fp", torch.device("cpu"))
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)
    for name in ("ema", "target"):
        for a, b in zip(e1[name].parameters(), e3[name].parameters()):
            assert torch.equal(a, b)


def test_checkpoint_of_other_settings_or_truncated_is_not_resumed(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = config(images=16)
    m = make()
    path = tmp_path / "r.pt"
    atomic_save({"step": 2, "fingerprint": "other"}, path)
    train(m, loss_fn_for(m, EpochSampler(40, 4, 3)), cfg, path, None, "fp", torch.device("cpu"))
    assert "made with other settings" in caplog.text
    path.write_bytes(b"PK\x03\x04 truncated")
    m = make()
    train(m, loss_fn_for(m, EpochSampler(40, 4, 3)), cfg, path, None, "fp", torch.device("cpu"))
    assert "cannot read the resume checkpoint" in caplog.text


def test_non_finite_loss_names_the_learning_rate(tmp_path):
    m = make()
    with pytest.raises(FloatingPointError, match=r"teacher\.lr"):
        train(m, lambda step, g, emas: m(DATA[:4]).sum() * float("nan"), config(), tmp_path / "n.pt", None,
              "fp", torch.device("cpu"))


def test_epoch_sampler_is_a_permutation_per_epoch_and_stateless():
    s = EpochSampler(10, 4, seed=1)
    first = torch.cat([s.indices(k) for k in range(5)])  # 20 indices = 2 epochs
    assert sorted(first[:10].tolist()) == list(range(10))
    assert sorted(first[10:].tolist()) == list(range(10))
    assert not torch.equal(first[:10], first[10:])
    assert torch.equal(EpochSampler(10, 4, seed=1).indices(3), s.indices(3))


def test_ema_update_and_generators():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)
    x = torch.randn(3, generator=seeded_generator(1, 2))
    assert torch.equal(x, torch.randn(3, generator=seeded_generator(1, 2)))
    assert not torch.equal(x, torch.randn(3, generator=seeded_generator(1, 3)))


def test_warmup_schedule():
    cfg = config(lr=1.0, warmup_images=8, batch_size=4)
    assert cfg.lr_at(0) == pytest.approx(0.5) and cfg.lr_at(1) == 1.0 and cfg.lr_at(5) == 1.0
    assert cfg.steps == 20 and math.isclose(config(images=81).steps, 21)


def test_config_from_a_params_section():
    from cmpipe.pipeline import params

    y = params.read_params(REPO_PARAMS)
    for section in ("teacher", "distill"):
        s = params.validate_section(section, y[section])
        cfg = train_config_from(s, section, log_every=7)
        assert (cfg.images, cfg.batch_size, cfg.lr, cfg.optimizer) == (s.images, s.batch_size, s.lr, s.optimizer)
        assert cfg.ema_decays == ema_names(s.ema_decays) and cfg.seed == s.seed and cfg.name == section
        assert cfg.log_every == 7 and cfg.checkpoint_every == s.checkpoint_every  # overrides win
        assert cfg.steps == math.ceil(s.images / s.batch_size)


def test_evaluation_scores_the_emas_on_schedule_and_changes_no_weight(tmp_path):
    """`evaluate` is called every eval_every images and after the last step, on the EMAs of
    cfg.ema_decays; its scores join the logged rows, it draws from the global RNG without changing
    the run, and a resumed run's history keeps the scores made before the interruption."""
    cfg = config(eval_every=24, ema_decays={"ema": 0.9})
    calls = []

    def evaluate(images, emas):
        calls.append(images)
        assert set(emas) == {"ema"}
        torch.rand(5)  # a sampler drawing from the global RNG must not change the training run
        return {"heldout_fid": {"ema": float(images)}}

    m0, m1 = make(), make()
    plain = train(m0, loss_fn_for(m0, EpochSampler(40, 4, 3)), config(ema_decays={"ema": 0.9}), tmp_path / "p.pt",
                  None, "fp", torch.device("cpu"))
    history = []
    scored = train(m1, loss_fn_for(m1, EpochSampler(40, 4, 3)), cfg, tmp_path / "a.pt", None, "fp",
                   torch.device("cpu"), evaluate=evaluate, history_out=history)
    assert calls == [24, 48, 80]  # 72 is within half a period of the end: left to the last step
    assert [r["images"] for r in history if "heldout_fid/ema" in r] == [24, 48, 80]
    assert all(r["heldout_fid/ema"] == r["images"] for r in history if "heldout_fid/ema" in r)
    for a, b in zip(plain["ema"].parameters(), scored["ema"].parameters()):
        assert torch.equal(a, b)

    m2 = make()
    with pytest.raises(KeyboardInterrupt):
        train(m2, loss_fn_for(m2, EpochSampler(40, 4, 3), stop_at=17), cfg, tmp_path / "b.pt", None, "fp",
              torch.device("cpu"), evaluate=evaluate)
    resumed = []
    m3 = make()
    train(m3, loss_fn_for(m3, EpochSampler(40, 4, 3)), cfg, tmp_path / "b.pt", None, "fp", torch.device("cpu"),
          evaluate=evaluate, history_out=resumed)
    assert [r["images"] for r in resumed if "heldout_fid/ema" in r] == [24, 48, 80]
