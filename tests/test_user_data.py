"""A user's own dataset (issue 15): 16-bit and transparent PNGs, held-out splits, a tracked
source, checked caches and weights, one-line errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cmpipe.data import load_source
from cmpipe.data.base import DataError

# ----------------------------------------------------------------------------- 16-bit and alpha

def test_16bit_gray_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520
    f = tmp_path / "imgs" / "c" / "ramp.png"
    f.parent.mkdir(parents=True)
    Image.fromarray(ramp).save(f)  # a real 16-bit gray PNG
    with Image.open(f) as im:
        assert im.mode in ("I;16", "I"), im.mode
    got = load_source("image_folder", tmp_path / "imgs", resolution=8, channels=1).splits["train"]
    expected = np.floor(ramp.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    assert np.array_equal(got.images[0, ..., 0], expected)
    assert got.images[0, 0, 1, 0] == 4 and (got.images == 255).mean() < 0.05  # 0, 4, 8 ... not white
    rgb = load_source("image_folder", tmp_path / "imgs", resolution=8, channels=3).splits["train"]
    assert np.array_equal(rgb.images[0], np.repeat(expected[..., None], 3, axis=-1))


def _rgba_folder(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere
    rgba[..., 3] = np.array([0, 128, 255, 255], np.uint8)[None, :]  # transparent .. opaque columns
    f = tmp_path / "imgs" / "c" / "a.png"
    f.parent.mkdir(parents=True)
    Image.fromarray(rgba, "RGBA").save(f)
    la = np.stack([np.full((4, 4), 100, np.uint8), np.full((4, 4), 0, np.uint8)], -1)
    Image.fromarray(la, "LA").save(f.parent / "b.png")
    return tmp_path / "imgs"


@pytest.mark.parametrize("background, bg", [("white", 255), ("black", 0)])
def test_alpha_is_composited_on_the_chosen_background(tmp_path, background, bg):
    root = _rgba_folder(tmp_path)
    im = load_source("image_folder", root, resolution=4, channels=3,
                     alpha_background=background).splits["train"].images
    a = np.array([0, 128, 255, 255])
    expected_r = (200 * a + bg * (255 - a) + 127) // 255
    expected_g = (0 * a + bg * (255 - a) + 127) // 255
    assert im[0, 0, :, 0].tolist() == expected_r.tolist()
    assert im[0, 0, :, 1].tolist() == expected_g.tolist()
    assert (im[1] == bg).all()  # the LA image is fully transparent: only the background is left


def test_alpha_refuse_names_the_file_and_the_key(tmp_path):
    root = _rgba_folder(tmp_path)
    with pytest.raises(DataError, match=r"c/a\.png: a transparent image.*shard\.alpha_background"):
        load_source("image_folder", root, resolution=4, channels=3, alpha_background="refuse")
    # an opaque RGBA image is not refused: its alpha changes nothing
    opaque = tmp_path / "opaque" / "c" / "o.png"
    opaque.parent.mkdir(parents=True)
    Image.fromarray(np.full((4, 4, 4), 255, np.uint8), "RGBA").save(opaque)
    out = load_source("image_folder", tmp_path / "opaque", resolution=4, channels=1,
                      alpha_background="refuse").splits["train"].images
    assert (out == 255).all()


# ----------------------------------------------------------------------------- one-line errors

REPO = Path(__file__).resolve().parents[1]
# every stage that reads params.yaml (report reads none)
STAGES = ("shard", "fid_ref", "teacher", "trajectories", "distill", "sample", "evaluate", "edit")


def _run(work: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO),
                                                       os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, check=False,
                          timeout=300)


def _one_line(run: subprocess.CompletedProcess) -> str:
    lines = [x for x in run.stderr.splitlines() if x.strip()]
    assert run.returncode != 0 and len(lines) == 1, run.stderr
    return lines[0]


@pytest.fixture(scope="module")
def broken_yaml(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("broken")
    good = (REPO / "params.yaml").read_text()
    text = good.replace("  steps: [1, 2, 3]", "  steps: [1, 2, 3", 1)  # an unclosed flow list
    assert text != good
    (work / "params.yaml").write_text(text)
    return work


@pytest.mark.parametrize("entry", [("-m", f"stages.{s}") for s in STAGES]
                         + [("-m", "cmpipe.pipeline.launch", f"stages.{s}")
                            for s in ("teacher", "trajectories", "distill", "sample", "evaluate")])
def test_yaml_syntax_error_is_one_line_in_every_entry_point(broken_yaml, entry):
    line = _one_line(_run(broken_yaml, *entry))
    name = entry[-1].rsplit(".", 1)[-1]
    assert re.fullmatch(rf"({name}|launch): params\.yaml: YAML syntax error at line \d+, column \d+ "
                        r"\(.+\); fix that line \(`git diff params\.yaml` shows what changed\)", line), line


def test_report_without_its_inputs_is_one_line(tmp_path):
    line = _one_line(_run(tmp_path, "-m", "stages.report"))
    assert line == ("report: reports/metrics.json or data/samples/sets.json is missing: "
                    "run `dvc repro evaluate` first"), line
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/metrics.json").write_text("{not json")
    assert _one_line(_run(tmp_path, "-m", "stages.report")).startswith(
        "report: reports/metrics.json: unreadable (Expecting property name")


def test_empty_and_mismatched_lists_are_params_errors(tmp_path):
    from cmpipe.models.networks import unet_config
    from cmpipe.pipeline import params

    model = yaml.safe_load((REPO / "params.yaml").read_text())["model"]
    with pytest.raises(params.ParamsError, match=r"^params\.yaml: model\.block_out_channels = \[\] needs at "
                                                 r"least 1 item$"):
        params.validate_section("model", dict(model, block_out_channels=[]))
    sample = yaml.safe_load((REPO / "params.yaml").read_text())["sample"]
    with pytest.raises(params.ParamsError, match=r"sample\.steps = \[\] needs at least 1 item"):
        params.validate_section("sample", dict(sample, steps=[]))
    with pytest.raises(params.ParamsError, match=r"sample\.ts\.2 = \[0\] must be a list of 2"):
        params.validate_section("sample", dict(sample, ts={2: [0]}))
    with pytest.raises(params.ParamsError, match=r"model\.attention_levels \[2\] are not levels of "
                                                 r"model\.block_out_channels \(0\.\.1\)"):
        unet_config([32, 64], 1, [2], 0.0, resolution=28, channels=1)
    with pytest.raises(params.ParamsError, match=r"has 4 levels.*use at most 3 levels"):
        unet_config([8, 8, 8, 8], 1, [], 0.0, resolution=28, channels=1)
    # the teacher stage on an empty list: one line naming the key
    params_yaml = yaml.safe_load((REPO / "params.yaml").read_text())
    params_yaml["model"]["block_out_channels"] = []
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_yaml, sort_keys=False))
    line = _one_line(_run(tmp_path, "-m", "stages.teacher"))
    assert line == "teacher: params.yaml: model.block_out_channels = [] needs at least 1 item", line


def test_evaluate_refuses_an_object_array_in_one_line(tmp_path):
    from cmpipe.errors import InputError
    from cmpipe.sampling.scores import load_set

    np.savez(tmp_path / "cm_nfe1.npz", images=np.array([{"a": 1}, None], dtype=object))
    args = (tmp_path / "sets.json", tmp_path / "ref.npz")
    with pytest.raises(InputError, match=r"cm_nfe1\.npz: unreadable sample set \(ValueError: "
                                         r"Object arrays cannot be loaded.*rerun `dvc repro -f sample`"):
        load_set(tmp_path / "cm_nfe1.npz", "cm_nfe1", {"count": 2}, (28, 28, 1), *args)
    (tmp_path / "cm_nfe2.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(InputError, match=r"cm_nfe2\.npz: unreadable sample set"):
        load_set(tmp_path / "cm_nfe2.npz", "cm_nfe2", {"count": 2}, (28, 28, 1), *args)


def test_evaluate_without_its_inputs_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    line = _one_line(_run(tmp_path, "-m", "stages.evaluate"))
    assert line == "evaluate: data/fid_ref.npz not found: run the fid_ref stage first (`dvc repro fid_ref`)", line


# ----------------------------------------------------------------------------- checked caches

def _cache(root: Path, x_n: float = 0.5) -> list[Path]:
    from cmpipe.data import write_shards
    from cmpipe.util.fileio import atomic_write_json
    from cmpipe.util.hashing import sha256_file

    recs = [{"__key__": f"pair_{i:09d}", "cls": i % 3, "json": {"image": i},
             "xn.npy": np.full((1, 4, 4), x_n, np.float32), "xnext.npy": np.zeros((1, 4, 4), np.float32)}
            for i in range(6)]
    shards = write_shards(root / "shards", iter(recs), maxcount=4, prefix="pairs")
    atomic_write_json(root / "cache.json", {"count": 6, "shape": [1, 4, 4], "shards": [
        {"path": str(s), "sha256": sha256_file(s)} for s in shards]})
    return shards


def test_a_modified_trajectory_cache_is_refused(tmp_path):
    from cmpipe.data import ShardError
    from cmpipe.training.trajectories import load_pairs

    root = tmp_path / "data" / "trajectories"
    shards = _cache(root)
    n, xn, _, _ = load_pairs(shards, (1, 4, 4))
    assert len(n) == 6 and float(xn.max()) == 0.5
    record = (root / "cache.json").read_bytes()
    _cache(root, x_n=7.0)  # the pairs rewritten with x_n = 7, the old record put back
    (root / "cache.json").write_bytes(record)
    with pytest.raises(ShardError, match=rf"{shards[0]}: sha256 \w+ differs from \w+ recorded in "
                                         rf"{root / 'cache.json'}; the file changed after it was written: "
                                         r"re-create the cache with `dvc repro -f trajectories`"):
        load_pairs(shards, (1, 4, 4))
    shards[1].unlink()
    _cache(root)  # all good again
    shards[1].unlink()
    with pytest.raises(ShardError, match=rf"{shards[1]}, listed in .*cache\.json, is missing: re-create"):
        load_pairs(shards, (1, 4, 4))


def test_a_modified_image_shard_is_refused_by_every_reader(tmp_path):
    from cmpipe.data import ShardError, load_image_split, shard_paths, write_dataset
    from cmpipe.data.base import SourceData, Split

    data = SourceData("npz", ["0"])
    data.splits["train"] = Split(np.zeros((5, 4, 4, 1), np.uint8), np.zeros(5, np.int64))
    manifest = tmp_path / "data" / "shards" / "manifest.json"
    write_dataset(data, manifest.parent, 2, {"train": "train", "ref": "train"}, root=tmp_path, progress=False)
    paths = shard_paths(manifest, role="train")
    data.splits["train"] = Split(np.full((5, 4, 4, 1), 7, np.uint8), np.zeros(5, np.int64))
    other = tmp_path / "other"
    write_dataset(data, other / "data" / "shards", 2, {"train": "train", "ref": "train"}, root=other,
                  progress=False)
    paths[0].write_bytes((other / paths[0].relative_to(tmp_path)).read_bytes())
    fix = r"restore the shards with `dvc checkout data/shards` or re-create them .* `dvc repro -f shard`"
    with pytest.raises(ShardError, match=rf"{paths[0].name}: sha256 .*{fix}"):
        shard_paths(manifest, role="train")  # the streaming loader's list of shards
    with pytest.raises(ShardError, match=rf"{paths[0].name}: sha256 .*{fix}"):
        load_image_split(manifest, role="train")


# ----------------------------------------------------------------------------- held-out split

def _npz(path: Path, n: int = 20) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (n, 6, 6), dtype=np.uint8)
    np.savez(path, images=images, labels=np.arange(n) % 3)
    return path, images


def test_holdout_is_deterministic_disjoint_and_order_free(tmp_path):
    from cmpipe.data.sources import hold_out

    path, images = _npz(tmp_path / "d.npz")
    a = hold_out(load_source("npz", path, resolution=6), 0.25)
    assert sorted(a.splits) == ["holdout", "train"]
    assert len(a.splits["holdout"].images) == 5 and len(a.splits["train"].images) == 15
    b = hold_out(load_source("npz", path, resolution=6), 5)  # a count: the same 5 images
    assert np.array_equal(a.splits["holdout"].images, b.splits["holdout"].images)
    held = {im.tobytes() for im in a.splits["holdout"].images}
    assert not held & {im.tobytes() for im in a.splits["train"].images}  # never trained on
    # the choice follows the images, not their order in the file
    perm = np.random.default_rng(1).permutation(20)
    np.savez(tmp_path / "p.npz", images=images[perm], labels=(np.arange(20) % 3)[perm])
    c = hold_out(load_source("npz", tmp_path / "p.npz", resolution=6), 0.25)
    assert {im.tobytes() for im in c.splits["holdout"].images} == held
    with pytest.raises(DataError, match=r"shard\.holdout = 20\.0 holds out 20 of the 20 images"):
        hold_out(load_source("npz", path, resolution=6), 20.0)
    with pytest.raises(DataError, match=r"shard\.holdout = 2\.5 is neither a fraction"):
        hold_out(load_source("npz", path, resolution=6), 2.5)


def write_class_folder(root: Path, count: int, seed: int) -> Path:
    """`count` random 5x5 gray PNGs in class folders a/ and b/ under `root`."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        f = root / ("a" if i % 2 else "b") / f"{i}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8)).save(f)
    return root


def test_shard_stage_holds_out_the_reference_of_a_flat_folder(tmp_path, monkeypatch):
    from cmpipe.pipeline.stage import run_stage

    root = write_class_folder(tmp_path / "imgs", 10, seed=2)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["shard"].update(source="image_folder", path=str(root), resolution=5, ref_split="train")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(REPO))
    from stages import shard as stage

    params["shard"]["ref_split"] = "test"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(SystemExit, match=r"shard\.ref_split = 'test' is not a split.*shard\.holdout: 0\.1 "
                                         r"and shard\.ref_split: holdout"):
        run_stage("shard", stage.main)
    params["shard"].update(holdout=3, ref_split="holdout")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_stage("shard", stage.main)
    manifest = json.loads((work / "data/shards/manifest.json").read_text())
    assert manifest["roles"] == {"train": "train", "ref": "holdout"}
    assert manifest["splits"]["holdout"]["count"] == 3 and manifest["splits"]["train"]["count"] == 7


# ----------------------------------------------------------------------------- a tracked source

def test_a_changed_source_folder_reruns_shard(tmp_path):
    """dvc.yaml lists `${shard.path}` as a dependency of shard: an added image shows in `dvc status`,
    for a folder outside the repository (as the Debian dataset is)."""
    from conftest import project_repo, run

    repo = tmp_path / "repo"
    repo.mkdir()
    source = write_class_folder(tmp_path / "images", 6, seed=3)  # outside the repository
    params = yaml.safe_load((REPO / "params-smoke.yaml").read_text())
    params["shard"].update(source="image_folder", path=str(source), resolution=8, holdout=2,
                           ref_split="holdout")
    env = project_repo(repo, yaml.safe_dump(params, sort_keys=False))

    def dvc(*args):
        return run(["dvc", *args], repo, env).stdout

    dvc("repro", "shard")
    assert "up to date" in dvc("status", "shard")
    (source / "a" / "new.png").write_bytes((source / "a" / "1.png").read_bytes())
    status = dvc("status", "shard")
    assert "changed deps" in status and re.search(rf"modified:\s+{re.escape(str(source))}\n", status), status
    assert "Running stage 'shard'" in dvc("repro", "shard")
    manifest = json.loads((repo / "data/shards/manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["holdout"]["count"] == 7
