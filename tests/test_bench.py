"""The benchmarks run and report their figures (their values are measured, never asserted),
and the streaming loader they time gives every image once, split between ranks and workers."""
import io
import math
import tarfile

import numpy as np
import pytest
import torch
from conftest import ROOT

from cmpipe.bench import distill_step, loader, sampling, scaling, trajectories
from cmpipe.bench.streaming import stream_images
from cmpipe.data import ShardError, encode_png, write_shards
from cmpipe.distributed.ddp import Dist

SMOKE = str(ROOT / "params-smoke.yaml")


def _finite_positive(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def _shards(directory, n=24, per_shard=6, size=28, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    records = ({"__key__": f"train_{i:06d}", "png": images[i], "cls": i % 10} for i in range(n))
    return write_shards(directory, records, per_shard), images


def test_distill_step_reports_rates_ratio_and_metric_costs():
    out = distill_step(batch_size=4, steps=1, metric="lpips", params_file=SMOKE,
                       device="cpu", lpips_resize=32, compare_metrics=True)
    assert out["metric"] == "lpips" and out["lpips_resize"] == 32
    assert set(out["cached_images_per_sec_by_metric"]) == {"l2", "pseudo_huber", "lpips"}
    rates = [out["cached_images_per_sec"], out["online_images_per_sec"],
             *out["cached_images_per_sec_by_metric"].values()]
    assert all(math.isfinite(r) and r > 0 for r in rates)
    assert out["ratio"] > 0 and out["step_time_relative_to_l2"]["l2"] == 1.0
    assert out["peak_rss_mb"] > 0
    assert out["limit"] == 1.5 and out["ratio_to_limit"] == pytest.approx(out["ratio"] / 1.5, abs=2e-3)


def test_stream_images_gives_every_image_once_across_ranks_and_workers(tmp_path):
    paths, images = _shards(tmp_path / "shards", n=24, per_shard=6, size=8)
    seen = {}
    for rank in range(2):
        for x, y in stream_images(paths, batch_size=4, workers=2, shuffle_buffer=5, seed=3,
                                  dist=Dist(rank, 2), pin_memory=False):
            assert x.dtype == torch.uint8 and x.shape[1:] == (1, 8, 8) and len(x) == len(y)
            for img, label in zip(x, y):
                seen.setdefault(img.numpy().tobytes(), []).append((rank, int(label)))
    assert len(seen) == len(images) and all(len(v) == 1 for v in seen.values())
    for i, img in enumerate(images):
        assert seen[img.tobytes()][0][1] == i % 10


def test_stream_images_refuses_members_off_the_whitelist(tmp_path):
    shard = tmp_path / "evil.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("k0.png", encode_png(np.zeros((8, 8), np.uint8))), ("k0.cls", b"1"),
                           ("k0.pyd", b"\x80\x04 not to be unpickled")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match=r"\.pyd"):
        list(stream_images([shard], batch_size=2, workers=0, shuffle_buffer=0))


def test_loader_bench_reports_rates_and_ratio(tmp_path):
    paths, _ = _shards(tmp_path / "shards", n=32, per_shard=16)
    out = loader(batch_size=4, steps=1, params_file=SMOKE, device="cpu", shards=[str(p) for p in paths],
                 workers=1, shuffle_buffer=8, loader_batches=4)
    assert out["bench"] == "loader" and out["device"] == "cpu" and out["threads"] >= 1
    assert out["images_timed"] == 16 and out["target"] == 10
    assert _finite_positive(out["loader_images_per_sec"], out["train_step_images_per_sec"], out["ratio"],
                            out["peak_rss_mb"])
    assert isinstance(out["meets_target"], bool)


def test_trajectories_bench_reports_rates_and_ratio():
    out = trajectories(batch_size=4, steps=1, params_file=SMOKE, device="cpu")
    assert out["bench"] == "trajectories" and out["device"] == "cpu" and out["threads"] >= 1
    assert _finite_positive(out["pairs_per_sec"], out["teacher_forward_images_per_sec"],
                            out["limit_pairs_per_sec"], out["ratio"], out["peak_rss_mb"])
    assert out["limit_pairs_per_sec"] == pytest.approx(out["teacher_forward_images_per_sec"] / 2, abs=0.01)


def test_sampling_bench_reports_rates_and_ratios():
    out = sampling(batch_size=2, steps=1, params_file=SMOKE, device="cpu")
    assert out["bench"] == "sampling" and out["nfe"] == {"cm1": 1, "cm2": 2, "teacher": 35}
    assert _finite_positive(*out["images_per_sec"].values(), out["peak_rss_mb"])
    assert _finite_positive(out["ratio_cm1_teacher"], out["ratio_cm2_teacher"],
                            out["ratio_to_limit_cm1"], out["ratio_to_limit_cm2"])
    assert out["limit_cm1_teacher"] == 35 and out["limit_cm2_teacher"] == 17.5


def test_scaling_bench_reports_one_and_two_process_rates():
    out = scaling(batch_size=4, steps=1, params_file=SMOKE, device="cpu", threads=1)
    assert out["bench"] == "scaling" and out["backend"] == "gloo" and out["processes"] == 2
    assert out["threads"] == 1 and out["limit"] == 2.0
    assert _finite_positive(out["one_process_images_per_sec"], out["two_process_images_per_sec"],
                            out["ratio"], out["efficiency"], out["peak_rss_mb"])
    assert len(out["peak_rss_mb_per_rank"]) == 2
