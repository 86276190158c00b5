"""The midtrain stage's pieces: its setup on a cached and an online trajectory, distill.init
honoured by every mode, and the params errors of the new keys (one line each)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_unet

from cmpipe.cm.karras import Sigmas
from cmpipe.cm.losses import l2, midtrain_loss
from cmpipe.cm.precond import EDMDenoiser
from cmpipe.data import write_shards
from cmpipe.errors import ParamsError
from cmpipe.models import networks
from cmpipe.pipeline import params
from cmpipe.pipeline.setups.distill import check_distill, ct_setup, distill_init, ect_setup
from cmpipe.pipeline.setups.midtrain import midtrain_setup, stratified_levels, trajectories_per_step
from cmpipe.pipeline.trajectory_cache import midtrain_grid, pairs_unused_because, whole_unused_because
from cmpipe.sampling.dpm_solver import dpm_solver_trajectory
from cmpipe.training.trajectories import compute_trajectories
from cmpipe.util.hashing import sha256_file

ROOT = Path(__file__).resolve().parents[1]
SIG = Sigmas()
SHAPE = (1, 8, 8)
CPU = torch.device("cpu")


def midtrain_params(**kw):
    base = dict(pairs="cache", seed=4, batch_size=6, points_per_trajectory=None, dropout=0.0, metric="l2",
                huber_c=None, lpips_net="alex", lpips_resize=None)
    return SimpleNamespace(**{**base, **kw})


def save_teacher(path: Path, seed=0):
    cfg, net = tiny_unet(1, seed)
    networks.save_model(path, "edm_teacher", cfg, {"ema": net.state_dict(), "model": net.state_dict()})
    return EDMDenoiser(net, 0.5).eval()


def write_whole_cache(out: Path, teacher, count: int, nfe: int, teacher_path: Path):
    grid = midtrain_grid(nfe, SIG)
    records = compute_trajectories(teacher, count, 1, grid, SHAPE, 4, torch.device("cpu"), parts_dir=out)
    shards = write_shards(out / "shards", records, maxcount=5, prefix="trajectories")
    (out / "cache.json").write_text(json.dumps({
        "count": count, "nfe": nfe, "grid": grid.tolist(), "teacher_sha256": sha256_file(teacher_path),
        "shards": [{"path": str(s), "sha256": sha256_file(s)} for s in shards]}))
    return grid


def test_midtrain_setup_regresses_cached_points_onto_their_ends(tmp_path):
    D = save_teacher(tmp_path / "teacher.pt")
    grid = write_whole_cache(tmp_path / "whole", D, count=6, nfe=3, teacher_path=tmp_path / "teacher.pt")
    m = midtrain_params()
    setup = midtrain_setup(m, 3, SIG, False, SHAPE, CPU, cache_dir=tmp_path / "whole",
                           teacher_path=tmp_path / "teacher.pt")
    assert setup.target_rate is None  # no target network: the ends are the targets
    # The student starts as the teacher's weights under the consistency scalings.
    for a, b in zip(setup.model.net.parameters(), D.net.parameters()):
        assert torch.equal(a, b)
    # Step 0 takes batch_size / nfe = 2 trajectories; recompute its loss from the solver itself.
    from cmpipe.training.loop import EpochSampler

    from cmpipe.training.trajectories import trajectory_randomness

    i = EpochSampler(6, 2, m.seed).indices(0)
    z = torch.stack([trajectory_randomness(1, int(k), SHAPE)[0] for k in i])
    traj = dpm_solver_trajectory(D, z, grid, 0.5)
    expected = midtrain_loss(setup.model, traj[:, :-1], grid[:-1], traj[:, -1], l2)
    got = setup.loss_at(0, torch.Generator().manual_seed(0), None)
    assert torch.allclose(got, expected, rtol=1e-5)


def test_stratified_levels_by_hand():
    # nfe 4, k 1: trajectory b of step t takes level (b + t) mod 4; k 2: (b + t) mod 2 and that + 2.
    assert stratified_levels(4, 1, 4, 0).tolist() == [[0], [1], [2], [3]]
    assert stratified_levels(4, 1, 4, 3).tolist() == [[3], [0], [1], [2]]
    assert stratified_levels(4, 2, 4, 1).tolist() == [[1, 3], [0, 2], [1, 3], [0, 2]]
    assert stratified_levels(2, 4, 4, 5).tolist() == [[0, 1, 2, 3]] * 2  # k = nfe: every point
    # Every level enters a step equally often.
    assert torch.bincount(stratified_levels(16, 2, 8, 7).flatten(), minlength=8).tolist() == [4] * 8


def test_midtrain_setup_spreads_a_step_over_more_trajectories(tmp_path):
    D = save_teacher(tmp_path / "teacher.pt")
    grid = write_whole_cache(tmp_path / "whole", D, count=8, nfe=3, teacher_path=tmp_path / "teacher.pt")
    m = midtrain_params(points_per_trajectory=1)
    assert trajectories_per_step(m, 3) == 6  # 6 points: one of each of 6 trajectories
    setup = midtrain_setup(m, 3, SIG, False, SHAPE, CPU, cache_dir=tmp_path / "whole",
                           teacher_path=tmp_path / "teacher.pt")
    from cmpipe.training.loop import EpochSampler
    from cmpipe.training.trajectories import trajectory_randomness

    for step in (0, 1):
        i = EpochSampler(8, 6, m.seed).indices(step)
        z = torch.stack([trajectory_randomness(1, int(k), SHAPE)[0] for k in i])
        traj = dpm_solver_trajectory(D, z, grid, 0.5)
        level = [(b + step) % 3 for b in range(6)]  # levels 0 1 2 0 1 2, shifted by the step
        x = torch.stack([traj[b, level[b]] for b in range(6)]).unsqueeze(1)
        expected = midtrain_loss(setup.model, x, grid[level].unsqueeze(1), traj[:, -1], l2)
        assert torch.allclose(setup.loss_at(step, torch.Generator().manual_seed(0), None), expected, rtol=1e-5)
    with pytest.raises(ParamsError, match=r"^midtrain.points_per_trajectory = 2 must divide trajectories.nfe = 3"):
        trajectories_per_step(midtrain_params(points_per_trajectory=2), 3)


def test_midtrain_setup_online_draws_fresh_trajectories_by_the_teacher(tmp_path):
    D = save_teacher(tmp_path / "teacher.pt")
    m = midtrain_params(pairs="online")
    setup = midtrain_setup(m, 2, SIG, False, SHAPE, CPU, cache_dir=tmp_path / "absent",
                           teacher_path=tmp_path / "teacher.pt")
    g = torch.Generator().manual_seed(5)
    z = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(5))
    grid = midtrain_grid(2, SIG)
    traj = dpm_solver_trajectory(D, z, grid, 0.5)
    expected = midtrain_loss(setup.model, traj[:, :-1], grid[:-1], traj[:, -1], l2)
    assert torch.allclose(setup.loss_at(0, g, None), expected, rtol=1e-5)


def test_midtrain_refuses_a_foreign_or_unused_cache_and_an_uneven_batch(tmp_path):
    D = save_teacher(tmp_path / "teacher.pt")
    write_whole_cache(tmp_path / "whole", D, count=4, nfe=3, teacher_path=tmp_path / "teacher.pt")
    from cmpipe.data import ShardError

    with pytest.raises(ShardError, match=r"holds 3-step trajectories, trajectories.nfe = 4; run `dvc repro"):
        midtrain_setup(midtrain_params(batch_size=8), 4, SIG, False, SHAPE, CPU, cache_dir=tmp_path / "whole",
                       teacher_path=tmp_path / "teacher.pt")
    save_teacher(tmp_path / "other.pt", seed=1)
    with pytest.raises(ShardError, match=r"made by another teacher"):
        midtrain_setup(midtrain_params(), 3, SIG, False, SHAPE, CPU, cache_dir=tmp_path / "whole",
                       teacher_path=tmp_path / "other.pt")
    (tmp_path / "unused").mkdir()
    (tmp_path / "unused" / "cache.json").write_text(json.dumps({"unused": "distill.init is teacher"}))
    with pytest.raises(ShardError, match=r"holds no trajectories: the trajectories stage ran while distill.init "
                                         r"is teacher"):
        midtrain_setup(midtrain_params(), 3, SIG, False, SHAPE, CPU, cache_dir=tmp_path / "unused",
                       teacher_path=tmp_path / "teacher.pt")
    with pytest.raises(ParamsError, match=r"^midtrain.batch_size = 7 must be a multiple of trajectories.nfe = 3"):
        trajectories_per_step(midtrain_params(batch_size=7), 3)


def save_midtrained(path: Path, seed=3):
    cfg, net = tiny_unet(1, seed)
    networks.save_model(path, "consistency", cfg, {"ema": net.state_dict(), "model": net.state_dict()})
    return net


def test_distill_init_midtrain_starts_every_mode_from_the_mid_trained_weights(tmp_path, monkeypatch):
    """The student's first weights are the mid-trained EMA's, in ct (instead of random weights) and
    in ect (instead of the teacher's); cd shares the same loader (student_of_teacher)."""
    monkeypatch.chdir(tmp_path)
    mid = save_midtrained(tmp_path / "midtrain.pt")
    save_teacher(tmp_path / "teacher.pt")
    manifest = make_manifest(tmp_path)
    d = SimpleNamespace(init="midtrain", batch_size=4, seed=0, dropout=0.0, weighting="uniform", ect_stage_images=8,
                        ect_q=2.0, ect_k=8.0, ect_b=1.0, ect_mapping="sigmoid", ect_P_mean=-1.1, ect_P_std=2.0,
                        ect_huber_c=0.0, ct_index="uniform", ict_P_mean=-1.1, ict_P_std=2.0)
    init = distill_init(d, tmp_path / "midtrain.pt")
    model = SimpleNamespace(class_conditional=False, block_out_channels=[8, 16], layers_per_block=1,
                            attention_levels=[], dropout=0.0)
    from cmpipe.cm.schedules import CTSchedule

    sched = CTSchedule(4, "ct", 2, 150, 0.9, 10, 1280, "fixed", 0.95)
    for setup in (ct_setup(d, SIG, model, sched, CPU, l2, manifest_path=manifest, init_path=init),
                  ect_setup(d, SIG, False, 4, CPU, manifest_path=manifest, teacher_path=tmp_path / "teacher.pt",
                            init_path=init)):
        for a, b in zip(setup.model.net.parameters(), mid.parameters()):
            assert torch.equal(a, b)
        assert sha256_file(init) in setup.inputs  # a resumed run must start from the same file
    with pytest.raises(ParamsError, match=r"^distill.init = midtrain but .*absent.pt does not exist: run `dvc repro "
                                          r"midtrain`$"):
        distill_init(d, tmp_path / "absent.pt")
    assert distill_init(SimpleNamespace(init="teacher")) is None


def make_manifest(root: Path) -> Path:
    """Shards of 8 random 8x8 gray training images and their manifest."""
    import numpy as np

    from cmpipe.data import SourceData, Split, write_dataset

    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
    data = SourceData("random", ["a"], {"train": Split(images, np.zeros(8, dtype=np.int64))})
    write_dataset(data, root / "shards", 4, {"train": "train", "ref": "train"}, root=root, progress=False)
    return root / "shards" / "manifest.json"


def test_params_errors_of_the_new_keys_are_one_line():
    y = params.read_params(ROOT / "params.yaml")
    bad = [("distill", "init", "student"), ("midtrain", "pairs", "disk"), ("trajectories", "nfe", 0),
           ("midtrain", "metric", "l3"), ("distill", "images", -1), ("midtrain", "points_per_trajectory", 0)]
    for section, key, value in bad:
        with pytest.raises(ParamsError) as e:
            params.validate_section(section, {**y[section], key: value})
        assert "\n" not in str(e.value) and f"{section}.{key}" in str(e.value)
    d = params.validate_section("distill", {**y["distill"], "images": 0, "init": "teacher"})
    with pytest.raises(ParamsError, match=r"^distill.images = 0 trains nothing"):
        check_distill(d)
    check_distill(params.validate_section("distill", {**y["distill"], "images": 0, "init": "midtrain"}))


def test_who_reads_which_cache():
    d = SimpleNamespace(mode="cd", pairs="cache", init="teacher", images=64)
    assert pairs_unused_because(d) is None and whole_unused_because(d) == "distill.init is teacher"
    d = SimpleNamespace(mode="ect", pairs="cache", init="midtrain", images=64)
    assert pairs_unused_because(d) == "distill.mode is ect" and whole_unused_because(d) is None
    d = SimpleNamespace(mode="cd", pairs="cache", init="midtrain", images=0)  # midtrain alone: no pairs
    assert pairs_unused_because(d) == "distill.images is 0 (no post-training)" and whole_unused_because(d) is None


def test_the_summary_shows_the_copy_check():
    from cmpipe.pipeline.report import copy_check_markdown

    check = {"distance": "per-pixel RMS in [-1, 1]", "no_cache": None,
             "sets": {"cm_nfe1": {"cached_ends": {"median": 0.25}, "training_images": {"median": 0.2}},
                      "teacher_heun_nfe35": {"cached_ends": {"median": 0.5}, "training_images": {"median": 0.4}}},
             "ratio_to_teacher": {"against": "teacher_heun_nfe35", "cached_ends": 0.5, "training_images": 0.5}}
    text = "\n".join(copy_check_markdown(check))
    assert "| cm_nfe1 " in text and "0.2500" in text and "0.4000" in text
    assert "(teacher_heun_nfe35): nearest cached clean end 0.500, nearest training image 0.500." in text
    no_cache = dict(check, no_cache="distill.init is teacher",
                    sets={"cm_nfe1": {"training_images": {"median": 0.2}}}, ratio_to_teacher=None)
    text = "\n".join(copy_check_markdown(no_cache))
    assert "No cache of whole trajectories (distill.init is teacher)." in text and "| -" in text
    assert copy_check_markdown({}) == []
