"""The training loop: resume after an interruption equals an uninterrupted run, bit for bit."""
import logging
import math
from pathlib import Path

import pytest
import torch

from cmpipe.pipeline.config import train_config_from
from cmpipe.training.ema import Averages, ema_names, ema_update
from cmpipe.training.loop import Checkpoint, EpochSampler, TrainConfig, train
from cmpipe.util.fileio import atomic_save
from cmpipe.util.seeding import seeded_generator

DATA = torch.randn(40, 3)
REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def config(**kw):
    base = dict(images=80, batch_size=4, lr=0.01, warmup_images=8, grad_clip=1.0,
                ema_decays={"ema": 0.9}, checkpoint_every=16, log_every=8, seed=3,
                name="teacher")
    base.update(kw)
    return TrainConfig(**base)


def run(model, loss_fn, cfg, path, target_rate=lambda k: 0.5, **kw):
    """(averages, history) of a run; by default with a target θ⁻ of rate 0.5."""
    averages = Averages(model, cfg.ema_decays, target_rate)
    history = train(model, loss_fn, cfg, averages, Checkpoint(path, "fp", cfg.name), torch.device("cpu"), **kw)
    return averages, history


def loss_fn_for(model, sampler, stop_at=None):
    def loss_fn(step, g, target):
        if step == stop_at:
            raise KeyboardInterrupt  # a kill between two checkpoints
        x = DATA[sampler.indices(step)]
        noise = torch.randn(x.shape[0], 1, generator=g)  # per-step randomness from (seed, step)
        return ((model(x) - x.sum(1, keepdim=True) - noise) ** 2).mean()
    return loss_fn


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = config()
    m1 = make()
    e1, _ = run(m1, loss_fn_for(m1, EpochSampler(40, 4, 3)), cfg, tmp_path / "a.pt")

    m2 = make()
    with pytest.raises(KeyboardInterrupt):
        run(m2, loss_fn_for(m2, EpochSampler(40, 4, 3), stop_at=11), cfg, tmp_path / "b.pt")
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 8  # the last checkpoint
    m3 = make()  # a fresh process: new model, resumes from the checkpoint
    e3, _ = run(m3, loss_fn_for(m3, EpochSampler(40, 4, 3)), cfg, tmp_path / "b.pt")
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)
    for name in ("ema", "target"):
        for a, b in zip(e1.modules()[name].parameters(), e3.modules()[name].parameters()):
            assert torch.equal(a, b)


def test_checkpoint_of_other_settings_or_truncated_is_not_resumed(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = config(images=16)
    m = make()
    path = tmp_path / "r.pt"
    atomic_save({"step": 2, "fingerprint": "other"}, path)
    run(m, loss_fn_for(m, EpochSampler(40, 4, 3)), cfg, path)
    assert "made with other settings" in caplog.text
    path.write_bytes(b"PK\x03\x04 truncated")
    m = make()
    run(m, loss_fn_for(m, EpochSampler(40, 4, 3)), cfg, path)
    assert "cannot read the resume checkpoint" in caplog.text


def test_non_finite_loss_names_the_learning_rate(tmp_path):
    m = make()
    with pytest.raises(FloatingPointError, match=r"teacher\.lr"):
        run(m, lambda step, g, target: m(DATA[:4]).sum() * float("nan"), config(), tmp_path / "n.pt")


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


def test_linear_schedule_falls_from_lr_after_the_warm_up_to_zero_after_the_last_step():
    # 20 steps, 2 of warm-up: steps 2..19 decay as (20 - k) / 18
    cfg = config(lr=1.0, warmup_images=8, batch_size=4, lr_schedule="linear")
    assert [cfg.lr_at(k) for k in (0, 1)] == [0.5, 1.0]
    assert cfg.lr_at(2) == 1.0 and cfg.lr_at(11) == pytest.approx(0.5) and cfg.lr_at(19) == pytest.approx(1 / 18)
    no_warm = config(lr=0.3, warmup_images=0, batch_size=4, lr_schedule="linear")
    assert no_warm.lr_at(0) == 0.3 and no_warm.lr_at(10) == pytest.approx(0.15)


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
    plain, _ = run(m0, loss_fn_for(m0, EpochSampler(40, 4, 3)), config(), tmp_path / "p.pt")
    scored, history = run(m1, loss_fn_for(m1, EpochSampler(40, 4, 3)), cfg, tmp_path / "a.pt", evaluate=evaluate)
    assert calls == [24, 48, 80]  # 72 is within half a period of the end: left to the last step
    assert [r["images"] for r in history if "heldout_fid/ema" in r] == [24, 48, 80]
    assert all(r["heldout_fid/ema"] == r["images"] for r in history if "heldout_fid/ema" in r)
    for a, b in zip(plain.evaluation["ema"].parameters(), scored.evaluation["ema"].parameters()):
        assert torch.equal(a, b)

    m2 = make()
    with pytest.raises(KeyboardInterrupt):
        run(m2, loss_fn_for(m2, EpochSampler(40, 4, 3), stop_at=17), cfg, tmp_path / "b.pt", evaluate=evaluate)
    m3 = make()
    _, resumed = run(m3, loss_fn_for(m3, EpochSampler(40, 4, 3)), cfg, tmp_path / "b.pt", evaluate=evaluate)
    assert [r["images"] for r in resumed if "heldout_fid/ema" in r] == [24, 48, 80]


def test_the_target_moves_after_each_optimizer_step_with_its_rate():
    """Step k's loss sees θ⁻ after step k-1: θ⁻ starts as θ, then θ⁻ <- μ(k) θ⁻ + (1 - μ(k)) θ right after
    optimizer step k (Algorithms 2 and 3); the evaluation EMAs move with their fixed decay."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1, bias=False)
    rates = [0.5, 0.25, 0.75]
    thetas, targets = [], []  # θ and θ⁻ as step k's loss sees them

    def loss_fn(step, g, target):
        thetas.append(model.weight.detach().clone())
        targets.append(target.weight.detach().clone())
        return (model(torch.ones(1, 2)) - 3.0).pow(2).sum()

    cfg = config(images=3, batch_size=1, warmup_images=0, grad_clip=None, log_every=1, checkpoint_every=100)
    averages = Averages(model, cfg.ema_decays, lambda k: rates[k])
    train(model, loss_fn, cfg, averages, Checkpoint(Path("/nonexistent/resume.pt"), "fp"), torch.device("cpu"))
    thetas.append(model.weight.detach().clone())
    targets.append(averages.target.weight.detach().clone())
    assert torch.equal(targets[0], thetas[0])
    for k, mu in enumerate(rates):
        assert not torch.equal(thetas[k + 1], thetas[k])  # the optimizer moved θ
        assert torch.allclose(targets[k + 1], mu * targets[k] + (1 - mu) * thetas[k + 1])
    assert averages.target.training  # θ⁻ runs in training mode, as the student (dropout masks)
    assert torch.allclose(averages.evaluation["ema"].weight,
                          0.9 ** 3 * thetas[0] + 0.1 * sum(0.9 ** (2 - k) * thetas[k + 1] for k in range(3)))


def test_the_curves_are_indexed_by_the_optimizer_step_and_survive_a_resume(tmp_path):
    import csv
    import json

    cfg = config(log_every=8)  # 20 steps of 4 images: a row every 2 steps
    m = make()
    with pytest.raises(KeyboardInterrupt):
        run(m, loss_fn_for(m, EpochSampler(40, 4, 3), stop_at=11), cfg, tmp_path / "r.pt", live_dir=tmp_path / "live")
    m = make()
    run(m, loss_fn_for(m, EpochSampler(40, 4, 3)), cfg, tmp_path / "r.pt", live_dir=tmp_path / "live")
    assert json.loads((tmp_path / "live" / "metrics.json").read_text())["step"] == cfg.steps == 20
    with open(tmp_path / "live" / "plots" / "metrics" / "loss.tsv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f, delimiter="\t")]
    assert steps == list(range(2, 21, 2))  # the replayed rows (2..8) then the resumed ones (10..20)
