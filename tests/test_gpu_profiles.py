"""The GPU profiles rehearsed on the CPU: each profile file itself becomes params.yaml of a temporary
project, and `dvc repro` runs the whole DAG with overrides that only shrink sizes and counts.

Everything a GPU run would execute for the first time runs here: for params-gpu-cifar10.yaml the
CIFAR-10 reader (on a small copy in torchvision's layout written by the test), RGB 32x32 with
attention, LPIPS as the training distance, RAdam with warm-up, online CD and the training stages
under torchrun (2 gloo processes); for params-gpu-quick.yaml the profile that scripts/gpu_check.sh
runs on a GPU (the default dataset, mid-training from cached trajectories, 10k-sample protocol).

Each profile's keys are classified: SHRINK (a smaller size or count, checked to be one), REDIRECT
(where the data is) or KEEP (as the profile says). A key in the profile that none of them names
fails the test: a new key must be looked at before the rehearsal claims to cover the profile.
"""
from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, Boom, project_repo, run

STAGES = {"shard", "fid_ref", "teacher", "trajectories", "midtrain", "distill", "sample", "copy_check",
          "evaluate", "edit", "report"}
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
CIFAR_PER_BATCH = 8   # 5 train batches: 40 training images; the test batch: 8


# ----------------------------------------------------------------------------- a small CIFAR-10 copy
def write_cifar10(root: Path, per_batch: int = CIFAR_PER_BATCH, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    """A CIFAR-10 copy in torchvision's layout (root/cifar-10-batches-py): pickled dicts with
    b"data" uint8 N x 3072 (R, G, B planes of 32x32) and b"labels", as the python version holds
    them, of patterned pixels (smooth colour gradients with a per-image offset, plus noise)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    index = 0
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = []
        for _ in range(per_batch):
            planes = [(xx * 8 + index * 13) % 256, (yy * 8 + index * 29) % 256, ((xx + yy) * 4 + index * 7) % 256]
            img = np.stack(planes).astype(np.float64) + rng.normal(0, 8, (3, 32, 32))
            images.append(np.clip(img, 0, 255).astype(np.uint8).reshape(3072))
            index += 1
        labels = [(index - per_batch + i) % 10 for i in range(per_batch)]
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": np.stack(images),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=protocol))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=protocol))
    return root


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_cifar10_reader_reads_a_copy_in_torchvisions_layout(tmp_path, protocol, caplog):
    from cmpipe.data.sources import load_source

    write_cifar10(tmp_path, protocol=protocol)
    data = load_source("cifar10", tmp_path, resolution=32, channels=3, limit=None)
    assert data.class_names[0] == "airplane" and len(data.class_names) == 10
    train, test = data.splits["train"], data.splits["test"]
    assert train.images.shape == (5 * CIFAR_PER_BATCH, 32, 32, 3) and test.images.shape == (CIFAR_PER_BATCH, 32, 32, 3)
    assert train.labels.tolist() == [i % 10 for i in range(5 * CIFAR_PER_BATCH)]
    with open(tmp_path / "cifar-10-batches-py/data_batch_2", "rb") as f:   # planes R, G, B -> H x W x C
        first = pickle.load(f)[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(train.images[CIFAR_PER_BATCH], first)
    assert "not the official batch files" in caplog.text
    assert len(load_source("cifar10", tmp_path, resolution=32, channels=3, limit=5).splits["test"].images) == 5


def test_cifar10_reader_unpickles_nothing_but_arrays_and_checks_shapes(tmp_path):
    from cmpipe.data.base import DataError
    from cmpipe.data.sources import load_source

    folder = write_cifar10(tmp_path) / "cifar-10-batches-py"
    marker = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Boom(str(marker)), b"labels": []}))
    with pytest.raises(DataError, match=r"data_batch_3 is not a CIFAR-10 batch pickle .*refusing to unpickle"):
        load_source("cifar10", tmp_path, resolution=32, channels=3)
    assert not marker.exists()
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"data_batch_3: 'data' is uint8 \(2, 1024\); expected uint8 N×3072"):
        load_source("cifar10", tmp_path, resolution=32, channels=3)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"no torchvision copy found .*data_batch_3"):
        load_source("cifar10", tmp_path, resolution=32, channels=3)


# ----------------------------------------------------------------------------- the rehearsals
# params-gpu-cifar10.yaml: sizes and counts shrunk to seconds; every other key as the profile says.
CIFAR10_SHRINK = {
    "shard.images_per_shard": 16,
    "dist.nproc_per_node": 2,                 # torchrun with 2 gloo processes (DDP, item-parallel stages)
    "fid_ref.count": 16, "fid_ref.batch_size": 16,
    "model.block_out_channels": [8, 16],      # 2 levels: attention_levels [1] stays a valid level
    "model.layers_per_block": 1,
    "teacher.images": 32, "teacher.batch_size": 16, "teacher.warmup_images": 8,   # 2 steps; warm-up > 0
    "teacher.heldout_fid_count": 8, "teacher.checkpoint_every": 16, "teacher.log_every": 16,
    "teacher.grid_steps": 2, "teacher.heldout_fid_nfe": 2,
    "trajectories.num_pairs": 16, "trajectories.batch_size": 16, "trajectories.images_per_shard": 16,
    "trajectories.num_trajectories": 8, "trajectories.nfe": 4,
    "midtrain.images": 16, "midtrain.batch_size": 16, "midtrain.heldout_fid_count": 8,
    "midtrain.checkpoint_every": 16, "midtrain.log_every": 16,
    "distill.images": 32, "distill.batch_size": 16, "distill.warmup_images": 8,   # 2 steps; warm-up > 0
    "distill.heldout_fid_count": 8, "distill.checkpoint_every": 16, "distill.log_every": 16,
    "distill.ect_stage_images": 16,
    "sample.count": 8, "sample.batch_size": 8, "sample.search_count": 8,
    "sample.steps": [1, 2], "sample.teacher_heun_nfe": [5], "sample.teacher_euler_nfe": [1],
    "sample.teacher_dpm_nfe": [2],   # one set of each kind (each set costs Inception time in evaluate)
    "evaluate.batch_size": 16, "evaluate.kid_subsets": 4, "evaluate.kid_subset_size": 8,
    "edit.count": 4, "edit.interp_pairs": 1, "edit.interp_frames": 3,
}
CIFAR10_REDIRECT = {"shard.path"}   # the test's small copy
# Keys both rehearsals keep as their profile has them.
KEPT_BY_BOTH = {
    "shard.source", "shard.download", "shard.resolution", "shard.resize_mode", "shard.channels",
    "shard.alpha_background", "shard.train_split", "shard.ref_split", "shard.holdout",
    "accel.bf16", "accel.tf32", "accel.channels_last", "accel.compile",
    "dist.nnodes", "dist.rdzv_endpoint", "dist.rdzv_id",
    "diffusion.sigma_min", "diffusion.sigma_max", "diffusion.sigma_data", "diffusion.rho", "diffusion.num_scales",
    "model.attention_levels", "model.dropout", "model.class_conditional",
    "teacher.checkpoint", "teacher.seed", "teacher.lr", "teacher.optimizer", "teacher.lr_schedule",
    "teacher.grad_clip", "teacher.ema_decays", "teacher.heldout_fid_every", "teacher.heldout_fid_seed",
    "teacher.P_mean", "teacher.P_std",
    "trajectories.seed", "trajectories.device", "trajectories.bf16",
    "midtrain.pairs", "midtrain.seed", "midtrain.points_per_trajectory", "midtrain.lr", "midtrain.optimizer", "midtrain.warmup_images",
    "midtrain.lr_schedule", "midtrain.grad_clip", "midtrain.dropout", "midtrain.metric", "midtrain.huber_c",
    "midtrain.lpips_net", "midtrain.lpips_resize", "midtrain.ema_decays", "midtrain.heldout_fid_every",
    "midtrain.heldout_fid_seed",
    "distill.init", "distill.mode", "distill.pairs", "distill.seed", "distill.lr", "distill.optimizer",
    "distill.lr_schedule", "distill.grad_clip", "distill.dropout", "distill.metric", "distill.huber_c",
    "distill.lpips_net", "distill.lpips_resize", "distill.weighting", "distill.mu_schedule", "distill.mu",
    "distill.ema_decays", "distill.heldout_fid_every", "distill.heldout_fid_seed",
    "distill.ct_num_scales", "distill.ct_s0", "distill.ct_s1", "distill.ct_mu0", "distill.ict_s0",
    "distill.ict_s1", "distill.ct_index", "distill.ict_P_mean", "distill.ict_P_std", "distill.ect_P_mean",
    "distill.ect_P_std", "distill.ect_q", "distill.ect_k", "distill.ect_b", "distill.ect_mapping",
    "distill.ect_huber_c",
    "sample.seed", "sample.ts", "sample.clip_denoised", "sample.search_ts", "sample.search_method",
    "sample.search_seed", "sample.class_label", "sample.device",
    "edit.seed", "edit.ts", "edit.inpaint_mask", "edit.inpaint_fraction", "edit.sr_factor", "edit.stroke_factor",
    "edit.stroke_levels", "edit.stroke_ts", "edit.stroke_image", "edit.lpips_resize",
}
CIFAR10_KEEP = KEPT_BY_BOTH | {"shard.limit"}   # null in the profile: all of the small copy

# params-gpu-quick.yaml: the same, on the real Fashion-MNIST (its first images of each split).
QUICK_SHRINK = {
    "shard.limit": 48, "shard.images_per_shard": 16,   # limit null (all) -> the first 48 of each split
    "fid_ref.count": 16, "fid_ref.batch_size": 16,
    "model.block_out_channels": [8, 16, 16],   # 3 levels: attention_levels [2] stays a valid level
    "model.layers_per_block": 1,
    "teacher.images": 32, "teacher.batch_size": 16, "teacher.warmup_images": 8,
    "teacher.heldout_fid_count": 8, "teacher.checkpoint_every": 16, "teacher.log_every": 16,
    "teacher.grid_steps": 2, "teacher.heldout_fid_nfe": 2,
    "trajectories.num_pairs": 16, "trajectories.batch_size": 16, "trajectories.images_per_shard": 16,
    "trajectories.num_trajectories": 8,
    "midtrain.images": 32, "midtrain.batch_size": 16, "midtrain.heldout_fid_count": 8,
    "midtrain.checkpoint_every": 16, "midtrain.log_every": 16,
    "distill.batch_size": 16, "distill.heldout_fid_count": 8, "distill.checkpoint_every": 16,
    "distill.log_every": 16, "distill.ect_stage_images": 16,
    "sample.count": 8, "sample.batch_size": 8, "sample.search_count": 8, "sample.teacher_heun_nfe": [5],
    "evaluate.batch_size": 16, "evaluate.kid_subsets": 4, "evaluate.kid_subset_size": 8,
    "edit.count": 4, "edit.interp_pairs": 1, "edit.interp_frames": 3,
}
QUICK_REDIRECT: set[str] = set()
QUICK_KEEP = KEPT_BY_BOTH | {
    "shard.path",                                   # the real Fashion-MNIST
    "dist.nproc_per_node",                          # one GPU: one process
    "trajectories.nfe", "distill.images", "distill.warmup_images",
    "sample.steps", "sample.teacher_euler_nfe", "sample.teacher_dpm_nfe",
}

REHEARSALS = {
    "params-gpu-cifar10.yaml": (CIFAR10_SHRINK, CIFAR10_REDIRECT, CIFAR10_KEEP),
    "params-gpu-quick.yaml": (QUICK_SHRINK, QUICK_REDIRECT, QUICK_KEEP),
}
# Keys where null means "no bound" (all images), so that any count is a shrink.
NULL_IS_ALL = {"shard.limit"}


def flat(params: dict) -> dict:
    """{"section.key": value} of a params file (sample.ts stays one key, as -S sees it)."""
    return {f"{s}.{k}": v for s, keys in params.items() for k, v in keys.items()}


def profile(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def is_shrink(key: str, old, new) -> bool:
    """new is a smaller (or equal) size or count than old, and stays positive where old was."""
    if old is None:
        return key in NULL_IS_ALL and isinstance(new, int) and new >= 1
    if isinstance(old, bool) or isinstance(new, bool):
        return False
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return new <= old and (new > 0 or old == 0)
    if isinstance(old, list) and isinstance(new, list):
        return 0 < len(new) <= len(old) and (set(new) <= set(old) or all(a <= b for a, b in zip(new, old)))
    return False


@pytest.mark.parametrize("name", sorted(REHEARSALS))
def test_the_rehearsal_classifies_every_key_of_the_profile_and_only_shrinks(name):
    shrink, redirect, keep = REHEARSALS[name]
    keys = set(flat(profile(name)))
    named = [set(shrink), redirect, keep]
    overlap = {k for i, a in enumerate(named) for b in named[i + 1:] for k in a & b}
    assert not overlap, f"{name}: keys classified twice: {sorted(overlap)}"
    union = set().union(*named)
    assert union == keys, (f"{name}: the rehearsal (tests/test_gpu_profiles.py) does not classify "
                           f"{sorted(keys - union)} (add each to its SHRINK or KEEP list); it names keys the "
                           f"profile lacks: {sorted(union - keys)}")
    base = flat(profile(name))
    grown = {k: (base[k], v) for k, v in shrink.items() if not is_shrink(k, base[k], v)}
    assert not grown, f"{name}: these overrides are not shrinks of the profile's values: {grown}"


def rehearsed_params(name: str, data: Path | None) -> dict:
    shrink, redirect, _ = REHEARSALS[name]
    p = profile(name)
    for key, value in shrink.items():
        section, k = key.split(".")
        p[section][k] = value
    if "shard.path" in redirect:
        p["shard"]["path"] = str(data)
    return p


def expected_sets(s: dict) -> set[str]:
    return ({f"cm_nfe{k}" for k in s["steps"]} | {f"teacher_heun_nfe{n}" for n in s["teacher_heun_nfe"]}
            | {f"teacher_euler_nfe{n}" for n in s["teacher_euler_nfe"]}
            | {f"teacher_dpm_nfe{n}" for n in s["teacher_dpm_nfe"]})


def rehearse(tmp_path: Path, name: str, data: Path | None = None) -> tuple[Path, dict, str]:
    """The profile with the shrink overrides as params.yaml of a new project; `dvc repro` of it."""
    p = rehearsed_params(name, data)
    repo = tmp_path / "project"
    repo.mkdir()
    env = project_repo(repo, f"# {name}, rehearsed (tests/test_gpu_profiles.py)\n" + yaml.safe_dump(p, sort_keys=False))
    r = run(["dvc", "repro"], repo, env)
    out = r.stdout + r.stderr
    assert set(re.findall(r"Running stage '([a-z_]+)'", out)) == STAGES, out[-3000:]
    m = json.loads((repo / "reports/metrics.json").read_text())
    sets = expected_sets(p["sample"])
    assert set(m["fid"]) == sets and set(m["kid"]) == sets, m
    assert all(math.isfinite(v) and v >= 0 for v in m["fid"].values()), m
    assert all(math.isfinite(v) for v in m["kid"].values()), m
    assert m["protocol"]["reference_count"] == p["fid_ref"]["count"]
    d = p["distill"]
    trained = ["teacher"] + ["midtrain"] * (d["init"] == "midtrain") + ["distill"] * (d["images"] > 0)
    for stage in trained:
        losses = (repo / f"reports/{stage}/plots/metrics/loss.tsv").read_text().split("\n")[1:]
        assert all(math.isfinite(float(row.split("\t")[-1])) for row in losses if row), (stage, losses)
    assert "up to date" in run(["dvc", "status"], repo, env).stdout
    return repo, p, out


@pytest.mark.slow
def test_cifar10_gpu_profile_rehearsed_on_the_cpu(tmp_path):
    """params-gpu-cifar10.yaml end to end: CIFAR-10 (the reader, RGB 32x32), attention, online CD with
    LPIPS and RAdam after a warm-up, the teacher with Adam and dropout, every training stage and the
    item-parallel ones under torchrun with 2 gloo processes, colorization (RGB only)."""
    data = write_cifar10(tmp_path / "cifar")
    repo, p, out = rehearse(tmp_path, "params-gpu-cifar10.yaml", data)
    assert (p["shard"]["source"], p["shard"]["channels"], p["shard"]["resolution"]) == ("cifar10", 3, 32)
    assert "torch.distributed.run --nproc_per_node=2" in out
    with np.load(repo / "data/samples/cm_nfe1.npz") as z:
        assert z["images"].shape[1:] == (32, 32, 3)
        assert z["images"].shape[0] == json.loads((repo / "data/samples/sets.json").read_text())["cm_nfe1"]["count"]
    assert not list((repo / "data").glob(".*parts*"))   # the ranks' temporary parts are gone
    d = p["distill"]
    assert d["metric"] == "lpips" and d["optimizer"] == "radam" and d["warmup_images"] > 0
    assert p["distill"]["pairs"] == "online" and p["distill"]["init"] == "teacher"
    assert json.loads((repo / "data/midtrain/unused.json").read_text())   # not in the profile's chain
    edit = json.loads((repo / "reports/edit/metrics.json").read_text())
    assert all(math.isfinite(edit["colorization"][k]) for k in ("psnr", "lpips"))


@pytest.mark.slow
def test_quick_gpu_profile_rehearsed_on_the_cpu(tmp_path):
    """params-gpu-quick.yaml end to end, as scripts/gpu_check.sh runs it on a GPU: Fashion-MNIST,
    teacher, cached whole trajectories, mid-training with two EMAs, no post-training, the ts search,
    the copy check against the cached ends."""
    if not FASHION.exists():
        pytest.skip(f"{FASHION} missing: `make setup` installs dataset-fashion-mnist")
    repo, p, _ = rehearse(tmp_path, "params-gpu-quick.yaml")
    assert p["distill"]["init"] == "midtrain" and p["distill"]["images"] == 0
    choice = json.loads((repo / "reports/midtrain/ema_selection.json").read_text())
    assert set(choice["fid"]) == {f"ema_{d}" for d in p["midtrain"]["ema_decays"]}
    copies = json.loads((repo / "reports/copy_check.json").read_text())
    assert set(copies["sets"]["cm_nfe1"]) == {"cached_ends", "training_images"}
    assert set(json.loads((repo / "reports/ts_search.json").read_text())["chosen"]) == {"2"}


def test_quick_gpu_profile_is_the_10k_protocol_on_one_gpu():
    """What the rehearsal shrinks, checked at the profile's own sizes: 10,000 samples per set against
    the whole test split, one process, the mid-training batch, the sets."""
    from cmpipe.pipeline import params
    from cmpipe.pipeline.config import sigmas_from
    from cmpipe.pipeline.setups.distill import check_distill
    from cmpipe.pipeline.setups.midtrain import points_per_trajectory, trajectories_per_step
    from cmpipe.sampling.plan import plan_sets

    data = params.read_params(ROOT / "params-gpu-quick.yaml")
    p = {section: params.validate_section(section, data[section]) for section in params.SCHEMA}
    assert p["shard"].source == "fashion_mnist" and p["shard"].ref_split == "test" and p["shard"].limit is None
    assert p["fid_ref"].count == p["sample"].count == 10_000   # Fashion-MNIST's test split holds 10,000
    assert p["dist"].nproc_per_node * p["dist"].nnodes == 1
    assert p["evaluate"].kid_subset_size <= p["sample"].count
    m, t, d = p["midtrain"], p["trajectories"], p["distill"]
    assert trajectories_per_step(m, t.nfe) * points_per_trajectory(m, t.nfe) == m.batch_size
    assert t.num_trajectories * t.nfe < m.images   # each cached trajectory is read several times
    assert (d.init, d.images) == ("midtrain", 0)
    check_distill(d)
    assert set(plan_sets(p["sample"], sigmas_from(p["diffusion"]))) == {"cm_nfe1", "cm_nfe2", "teacher_heun_nfe35"}
