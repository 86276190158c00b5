"""The trajectory cache: per-pair randomness, independence of the batch size, shard round trip."""
import torch

from cmpipe.cm.karras import Sigmas, heun_step
from cmpipe.cm.precond import EDMDenoiser
from cmpipe.data import write_shards
from cmpipe.models.networks import build_unet, unet_config
from cmpipe.training.trajectories import compute_pairs, load_pairs, pair_randomness


def teacher():
    torch.manual_seed(0)
    return EDMDenoiser(build_unet(unet_config([16, 32], 1, [], 0.0, 8, 1)), 0.5).eval()


def test_cache_is_independent_of_batch_size_and_matches_the_formula(tmp_path):
    sig, T = Sigmas(), teacher()
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    a = list(compute_pairs(T, images, 7, 11, sig, 3, torch.device("cpu"), parts_dir=tmp_path / "t"))
    b = list(compute_pairs(T, images, 7, 11, sig, 7, torch.device("cpu"), parts_dir=tmp_path / "t"))
    grid = sig.grid().float()
    for i, (ra, rb) in enumerate(zip(a, b)):
        assert ra["__key__"] == rb["__key__"] == f"pair_{i:09d}"
        assert ra["cls"] == rb["cls"] and ra["json"] == rb["json"]
        assert (ra["xn.npy"] == rb["xn.npy"]).all()  # x + sigma_n z: elementwise, exact
        assert abs(ra["xnext.npy"] - rb["xnext.npy"]).max() < 1e-5  # batched convolutions may round apart
        img, n, z = pair_randomness(11, i, 5, sig.num_scales, (1, 8, 8))
        assert 0 <= n <= sig.num_scales - 2 and ra["cls"] == n and ra["json"]["image"] == img
        x = images[img].float() / 127.5 - 1
        x_n = x + grid[n] * z
        assert torch.allclose(torch.from_numpy(ra["xn.npy"]), x_n, atol=1e-5)
        with torch.no_grad():
            x_next = heun_step(T, x_n[None], grid[n], grid[n + 1])[0]
        assert torch.allclose(torch.from_numpy(ra["xnext.npy"]), x_next, atol=1e-4)
    paths = write_shards(tmp_path / "c", iter(a), maxcount=3, prefix="pairs")
    n, xn, xnext, labels = load_pairs(paths, (1, 8, 8))
    assert labels is None   # an unconditional teacher's cache
    assert len(paths) == 3 and n.tolist() == [r["cls"] for r in a]
    assert torch.equal(xn[4], torch.from_numpy(a[4]["xn.npy"]))


def test_cd_setup_refuses_a_missing_or_foreign_cache_before_loading_the_teacher(tmp_path):
    import json
    from types import SimpleNamespace

    import pytest

    from cmpipe.data import ShardError
    from cmpipe.pipeline.setups.distill import cd_setup

    d = SimpleNamespace(batch_size=4, seed=0, huber_c=None, weighting="uniform", pairs="cache")
    absent_teacher = tmp_path / "no-teacher.pt"  # never read: the cache is checked first
    with pytest.raises(ShardError, match=r"cache\.json not found: run `dvc repro trajectories` first"):
        cd_setup(d, Sigmas(), False, "cpu", "l2", cache_dir=tmp_path / "none", teacher_path=absent_teacher)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cache.json").write_text(json.dumps({"num_scales": 10}))
    with pytest.raises(ShardError, match=r"10-point grid but diffusion\.num_scales = 18; run `dvc repro"):
        cd_setup(d, Sigmas(), False, "cpu", "l2", cache_dir=tmp_path / "c", teacher_path=absent_teacher)


def test_resolve_metric_binds_the_pixel_distances():
    from cmpipe.cm.losses import PseudoHuber, l1, l2
    from cmpipe.pipeline.config import resolve_metric

    assert [resolve_metric(m) for m in ("l2", "l1")] == [l2, l1]
    assert resolve_metric("pseudo_huber") == PseudoHuber(None)
    assert resolve_metric("pseudo_huber", huber_c=0.03) == PseudoHuber(0.03)
