"""Consistency Mid-Training (CMT) library pieces: the logSNR grid, DPM-Solver++(2M) trajectories,
the mid-training loss, the cache of whole trajectories and the copy check."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_unet

from cmpipe.cm.karras import Sigmas, logsnr_sigmas
from cmpipe.cm.losses import PseudoHuber, l2, midtrain_loss
from cmpipe.cm.precond import ConsistencyFunction, EDMDenoiser, c_noise
from cmpipe.data import ShardError, sha256_file, write_shards
from cmpipe.metrics.copy_check import copy_check, copy_summary, nearest_distances
from cmpipe.sampling.dpm_solver import dpm_solver_trajectory
from cmpipe.sampling.sets import sample_dpm_solver
from cmpipe.training.trajectories import compute_trajectories, load_trajectories, trajectory_randomness
from cmpipe.util.images import to_uint8

SIG = Sigmas()
CPU = torch.device("cpu")


def teacher(num_classes=None):
    return EDMDenoiser(tiny_unet(1, 0, 8, num_classes)[1], 0.5).eval()


# ------------------------------------------------------------------------------------------- grid

def test_logsnr_grid_matches_the_reference_formula():
    s = logsnr_sigmas(16)
    assert s.shape == (17,) and s[0] == 80.0 and s[-1] == 0.002 and bool((s[1:] < s[:-1]).all())
    steps = torch.diff(s.log())
    assert torch.allclose(steps, torch.full_like(steps, math.log(0.002 / 80) / 16), atol=1e-12)
    # sony/cmt: DPM-Solver's get_time_steps('logSNR') with lambda = -ln t, in float32
    lam_T, lam_0 = -math.log(80.0), -math.log(0.002)
    ref = torch.exp(-(torch.linspace(0, 1, 17) * (lam_0 - lam_T) + lam_T))
    assert torch.allclose(s.float(), ref, rtol=1e-5)
    assert logsnr_sigmas(1).tolist() == [80.0, 0.002]
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="nfe >= 1"):
            logsnr_sigmas(bad)
    with pytest.raises(ValueError, match="sigma_min"):
        logsnr_sigmas(4, sigma_min=80.0, sigma_max=1.0)


# ----------------------------------------------------------------------------------- trajectories

def scheduler_grid(nfe):
    """The grid sample_dpm_solver runs on: diffusers' (nfe + 1)-point Karras grid, sigma_min -> 0."""
    from diffusers import EDMDPMSolverMultistepScheduler

    sched = EDMDPMSolverMultistepScheduler(sigma_min=SIG.sigma_min, sigma_max=SIG.sigma_max,
                                           sigma_data=SIG.sigma_data, rho=SIG.rho, sigma_schedule="karras")
    sched.set_timesteps(nfe + 1)
    return torch.cat([sched.sigmas[:nfe], torch.zeros(1)])


@pytest.mark.parametrize("nfe", [1, 2, 5])
def test_trajectory_ends_at_sample_dpm_solver_exactly(nfe):
    T = teacher()
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(nfe))
    grid = scheduler_grid(nfe)
    assert torch.allclose(grid[:-1].double(), SIG.grid(nfe + 1)[:-1], rtol=1e-5)
    with torch.no_grad():
        want = sample_dpm_solver(T, z, SIG, nfe)
    # sample_dpm_solver starts at sigma_max z = 80 z, its grid's first level is 79.99998 (float32)
    assert float(grid[0]) != 80.0
    traj = dpm_solver_trajectory(T, z, grid, x_start=z * SIG.sigma_max)
    assert traj.shape == (3, nfe + 1, 1, 8, 8)
    assert torch.equal(traj[:, -1], want) and torch.equal(traj[:, 0], z * 80.0)
    own = dpm_solver_trajectory(T, z, grid)  # from sigmas[0] z
    assert torch.equal(own[:, 0], z * grid[0]) and torch.allclose(own[:, -1], want, rtol=1e-5, atol=1e-6)


def gaussian(x, sigma):
    """The exact denoiser of N(mu, s^2) data (so the ODE solution is known in closed form)."""
    mu, s2 = 0.3, 0.2 ** 2
    sigma = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)
    return mu + s2 / (s2 + sigma ** 2) * (x - mu)


def dpmpp_2m_by_hand(denoise, x, sigmas):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in lambda = -ln sigma, first and last steps
    first order, every point kept."""
    out, prev = [x], None
    for i in range(len(sigmas) - 1):
        s, t = sigmas[i], sigmas[i + 1]
        d = denoise(x, torch.full((x.shape[0],), float(s), dtype=x.dtype))
        h = -math.log(t) + math.log(s)
        if prev is None or i == len(sigmas) - 2:
            dd = d
        else:
            r = prev[1] / h
            dd = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * prev[0]
        x = (t / s) * x - math.expm1(-h) * dd
        prev = (d, h)
        out.append(x)
    return torch.stack(out, 1)


def test_trajectory_on_the_logsnr_grid_is_dpm_solver_2m():
    grid = logsnr_sigmas(6)
    z = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    traj = dpm_solver_trajectory(gaussian, z, grid)
    assert traj.shape == (4, 7, 2, 3, 3)
    assert torch.equal(traj[:, 0], z * 80.0)
    want = dpmpp_2m_by_hand(gaussian, z * 80.0, grid.float().double().tolist())
    assert torch.allclose(traj, want, rtol=1e-5, atol=1e-6)
    # the PF-ODE of N(mu, s^2) data keeps (x - mu) / sqrt(s^2 + sigma^2): its exact end
    exact = 0.3 + math.sqrt(0.04 + 0.002 ** 2) / math.sqrt(0.04 + 80 ** 2) * (z * 80 - 0.3)
    err6 = (traj[:, -1] - exact).abs().max()
    err40 = (dpm_solver_trajectory(gaussian, z, logsnr_sigmas(40))[:, -1] - exact).abs().max()
    assert err40 < 5e-3 and err40 < err6 / 10 and err6 < 0.1


def test_trajectory_refuses_bad_grids_and_noise():
    z = torch.randn(2, 1, 4, 4)
    for bad, msg in (([80.0], "at least 2"), ([1.0, 2.0], "strictly decreasing"), ([80.0, 80.0], "strictly"),
                     ([80.0, -1.0], "positive"), ([[80.0, 1.0]], "1-D"), ([80.0, float("nan")], "non-finite")):
        with pytest.raises(ValueError, match=f"sigmas.*{msg}|{msg}.*sigmas"):
            dpm_solver_trajectory(gaussian, z, bad)
    with pytest.raises(ValueError, match="noise must be a batch"):
        dpm_solver_trajectory(gaussian, torch.randn(0, 1, 4, 4), [80.0, 0.0])


# ------------------------------------------------------------------------------------------- loss

def test_midtrain_loss_by_hand():
    torch.manual_seed(0)
    net = tiny_unet(1, 3, 8)[1]
    f = ConsistencyFunction(net, 0.5, 0.002)
    traj = torch.randn(2, 3, 1, 8, 8)
    sig = torch.tensor([80.0, 1.5, 0.002])
    points, end = traj[:, :2], traj[:, 2]

    def f_by_hand(x, s):
        sd, eps = 0.5, 0.002
        c_skip = sd ** 2 / ((s - eps) ** 2 + sd ** 2)
        c_out = (s - eps) * sd / math.sqrt(s ** 2 + sd ** 2)
        c_in = 1 / math.sqrt(s ** 2 + sd ** 2)
        F = net(c_in * x, c_noise(torch.full((x.shape[0],), s))).sample
        return c_skip * x + c_out * F

    with torch.no_grad():
        for d in (l2, PseudoHuber()):
            got = midtrain_loss(f, points, sig[:2], end, d)
            terms = [d(f_by_hand(points[b:b + 1, i], float(sig[i])), end[b:b + 1])
                     for b in range(2) for i in range(2)]
            assert torch.allclose(got, torch.cat(terms).mean(), rtol=1e-5, atol=1e-7)
        # per-trajectory levels (B x P) give the same number
        assert torch.allclose(midtrain_loss(f, points, sig[:2].expand(2, 2), end, l2),
                              midtrain_loss(f, points, sig[:2], end, l2))
    # gradients reach the student
    midtrain_loss(f, points, sig[:2], end, l2).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_midtrain_loss_refuses_the_clean_end_and_bad_shapes():
    f = ConsistencyFunction(tiny_unet(1, 0, 8)[1], 0.5, 0.002)
    traj, sig = torch.randn(2, 3, 1, 8, 8), torch.tensor([80.0, 1.5, 0.002])
    with pytest.raises(ValueError, match="boundary sigma_min"):
        midtrain_loss(f, traj, sig, traj[:, -1], l2)
    with pytest.raises(ValueError, match="end has shape"):
        midtrain_loss(f, traj[:, :2], sig[:2], traj[:1, -1], l2)
    with pytest.raises(ValueError, match="sigmas has shape"):
        midtrain_loss(f, traj[:, :2], sig, traj[:, -1], l2)
    with pytest.raises(ValueError, match="points must be"):
        midtrain_loss(f, traj[:0, :2], sig[:2], traj[:0, -1], l2)


# ------------------------------------------------------------------------------------------ cache

def test_cache_equals_the_solver_and_does_not_depend_on_the_batch_size(tmp_path):
    T, grid = teacher(), logsnr_sigmas(4)
    a = list(compute_trajectories(T, 5, 7, grid, (1, 8, 8), 5, CPU, parts_dir=tmp_path / "p"))
    b = list(compute_trajectories(T, 5, 7, grid, (1, 8, 8), 2, CPU, parts_dir=tmp_path / "p"))
    z = torch.stack([trajectory_randomness(7, i, (1, 8, 8))[0] for i in range(5)])
    want = dpm_solver_trajectory(T, z, grid)
    for i, (ra, rb) in enumerate(zip(a, b)):
        assert ra["__key__"] == rb["__key__"] == f"traj_{i:09d}" and ra["json"] == rb["json"] == {"index": i}
        assert torch.equal(torch.from_numpy(ra["points.npy"]), want[i])  # one batch of all five: exact
        assert abs(ra["points.npy"] - rb["points.npy"]).max() < 1e-4    # batched convolutions round apart
        assert np.array_equal(ra["sigmas.npy"], grid.float().numpy())
    # a later range of indices is the same trajectories (several processes, resumed runs)
    c = list(compute_trajectories(T, 5, 7, grid, (1, 8, 8), 5, CPU, parts_dir=tmp_path / "p",
                                  indices=range(3, 5)))
    assert [r["__key__"] for r in c] == ["traj_000000003", "traj_000000004"]
    assert abs(c[1]["points.npy"] - a[4]["points.npy"]).max() < 1e-4

    shards = write_shards(tmp_path / "cache" / "shards", iter(a), maxcount=2, prefix="traj")
    (tmp_path / "cache" / "cache.json").write_text(json.dumps(
        {"shards": [{"path": str(s), "sha256": sha256_file(s)} for s in shards]}))
    points, sigmas, ends, labels = load_trajectories(shards, (1, 8, 8))
    assert len(shards) == 3 and labels is None
    assert points.shape == (5, 5, 1, 8, 8) and torch.equal(points, want)
    assert torch.equal(sigmas, grid.float()) and torch.equal(ends, want[:, -1])

    data = bytearray(shards[1].read_bytes())
    data[700] ^= 1
    shards[1].write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{shards[1]}: sha256 .* differs"):
        load_trajectories(shards)
    with pytest.raises(ShardError, match="no shard paths"):
        load_trajectories([])


def test_cache_of_a_class_conditional_teacher(tmp_path):
    T, grid = teacher(num_classes=3), logsnr_sigmas(2)
    recs = list(compute_trajectories(T, 4, 1, grid, (1, 8, 8), 3, CPU, parts_dir=tmp_path / "p"))
    for i, r in enumerate(recs):
        z, y = trajectory_randomness(1, i, (1, 8, 8), 3)
        assert r["json"] == {"index": i, "label": y} and 0 <= y < 3
        assert torch.equal(z, trajectory_randomness(1, i, (1, 8, 8))[0])  # the unconditional cache's noise
        want = dpm_solver_trajectory(T.with_labels(torch.tensor([y])), z[None], grid)[0]
        assert torch.allclose(torch.from_numpy(r["points.npy"]), want, atol=1e-4)
    shards = write_shards(tmp_path / "s", iter(recs), maxcount=10, prefix="traj")
    points, _, _, labels = load_trajectories(shards, verify=False)
    assert labels.tolist() == [r["json"]["label"] for r in recs] and points.shape[:2] == (4, 3)
    with pytest.raises(ShardError, match=r"shape \(3, 1, 8, 8\) at 3 levels; expected levels x \(3, 8, 8\)"):
        load_trajectories(shards, (3, 8, 8), verify=False)


def test_compute_trajectories_refuses_bad_input(tmp_path):
    T = teacher()
    with pytest.raises(ValueError, match="parts_dir .* is required"):
        list(compute_trajectories(T, 2, 0, logsnr_sigmas(2), (1, 8, 8), 2, CPU, parts_dir=None))
    with pytest.raises(ValueError, match="strictly decreasing"):
        list(compute_trajectories(T, 2, 0, [0.002, 80.0], (1, 8, 8), 2, CPU, parts_dir=tmp_path))
    with pytest.raises(ValueError, match="shape must be the image shape"):
        list(compute_trajectories(T, 2, 0, logsnr_sigmas(2), (8, 8), 2, CPU, parts_dir=tmp_path))
    with pytest.raises(ValueError, match="num_trajectories"):
        list(compute_trajectories(T, 0, 0, logsnr_sigmas(2), (1, 8, 8), 2, CPU, parts_dir=tmp_path))
    with pytest.raises(ValueError, match="batch_size"):
        list(compute_trajectories(T, 2, 0, logsnr_sigmas(2), (1, 8, 8), 0, CPU, parts_dir=tmp_path))


# ------------------------------------------------------------------------------------- copy check

def test_copy_check_by_hand():
    g = torch.Generator().manual_seed(0)
    refs = torch.randint(0, 200, (7, 3, 4, 5), dtype=torch.uint8, generator=g)      # N C H W
    samples = refs[[2, 5, 0]].permute(0, 2, 3, 1).numpy().copy()                     # N H W C
    samples[1] += 51                                                                 # 51/127.5 = 0.4 everywhere
    d, idx = nearest_distances(samples, refs, samples_layout="NHWC", references_layout="NCHW")
    assert idx.tolist()[::2] == [2, 0] and d[0] == 0 and d[2] == 0
    assert idx[1] == 5 and abs(float(d[1]) - 0.4) < 1e-12
    for chunk, rchunk in ((1, 1), (2, 3), (100, 100)):
        d2, idx2 = nearest_distances(samples, refs, samples_layout="NHWC", references_layout="NCHW",
                                     chunk=chunk, reference_chunk=rchunk)
        assert torch.equal(d2, d) and torch.equal(idx2, idx)
    # float references (cached ends) are compared as a sample set stores them
    ends = refs.float() / 127.5 - 1
    assert torch.equal(nearest_distances(to_uint8(ends), ends, samples_layout="NHWC",
                                         references_layout="NCHW")[0], torch.zeros(7, dtype=torch.float64))
    s = copy_check(samples, refs, references_layout="NCHW")
    assert s["count"] == 3 and s["reference_count"] == 7 and s["min"] == 0
    assert abs(s["mean"] - 0.4 / 3) < 1e-12 and s["median"] == 0 and abs(s["p10"]) < 1e-12
    assert copy_summary(torch.tensor([1.0, 2.0, 3.0, 4.0]), 9)["median"] == 2.5


def test_copy_check_refuses_bad_input():
    refs = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="samples is empty"):
        nearest_distances(np.zeros((0, 4, 4, 1), np.uint8), refs, samples_layout="NHWC", references_layout="NCHW")
    with pytest.raises(ValueError, match="references is empty"):
        nearest_distances(np.zeros((1, 4, 4, 1), np.uint8), refs[:0], samples_layout="NHWC", references_layout="NCHW")
    with pytest.raises(ValueError, match="compares images of one shape"):
        nearest_distances(np.zeros((1, 4, 4, 3), np.uint8), refs, samples_layout="NHWC", references_layout="NCHW")
    with pytest.raises(ValueError, match="samples must be N images"):
        nearest_distances(np.zeros((4, 4, 1), np.uint8), refs, samples_layout="NHWC", references_layout="NCHW")
    with pytest.raises(ValueError, match="references_layout must be one of"):
        nearest_distances(np.zeros((1, 4, 4, 1), np.uint8), refs, samples_layout="NHWC", references_layout="CHW")
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        nearest_distances(np.zeros((1, 4, 4, 1), np.uint8), refs, samples_layout="NHWC",
                          references_layout="NCHW", chunk=0)
    with pytest.raises(ValueError, match="distances is empty"):
        copy_summary(torch.zeros(0), 3)
