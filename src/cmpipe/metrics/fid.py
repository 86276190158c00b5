"""Inception features, FID and KID, exactly as clean-fid computes them (mode 'clean').

clean-fid's folder pipeline, which this module reproduces on in-memory arrays:
  PIL opens the PNG and converts it to RGB (a gray image repeats its channel),
  each channel is resized on its own as a float32 PIL image ('F' mode) with
  bicubic filtering to 299x299 and clipped to [0, 255] without re-quantising,
  the result goes to NVIDIA's TorchScript Inception as (x - 128) / 128, and the
  2048-d pool features come back as float32.
Going through arrays instead of PNG files skips the disk and the DataLoader;
the features equal clean-fid's own (tests/test_evaluation.py checks it).

One pass of features per image set feeds both metrics: FID from (mu, sigma) and
KID from the features themselves, so the reference set is stored with both.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cmpipe.util.fileio import atomic_savez
from cmpipe.weights import inception as assets

log = logging.getLogger(__name__)

MODE = "clean"
INCEPTION_SIZE = 299
FEATURE_DIM = assets.FEATURE_DIM


def cleanfid_version() -> str:
    # cleanfid has no __version__ attribute; the distribution metadata has it.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clean-fid")
    except PackageNotFoundError:
        return "unknown"


def default_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu' (features agree across devices to ~1e-5)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- model
class InceptionExtractor:
    """clean-fid's InceptionV3W on the offline weights, ready to take 299x299 batches.

    Call it with a float32 tensor N x 3 x 299 x 299 in [0, 255]; it returns N x 2048.
    """

    def __init__(self, model, device, channels_last: bool, path: Path):
        self.model = model
        self.device = device
        self.channels_last = channels_last
        self.path = path

    def __call__(self, batch):
        import torch

        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        batch = batch.to(self.device).contiguous(memory_format=memory_format)
        with torch.no_grad():
            return self.model(batch)


def build_inception(device: Any = "cpu", channels_last: bool = True,
                    path: str | Path | None = None) -> InceptionExtractor:
    """clean-fid's feature extractor for mode 'clean', loaded from the offline file.

    path: a TorchScript ``inception-2015-12-05.pt``; default `assets.inception_path()`.
    channels_last: NHWC activations let oneDNN pick its NHWC convolutions on CPU.
      On this project's 2-core AVX2 EPYC machine the gain measured ~10% (about 5 img/s
      either way; docs/design.md §4). The features
      differ from NCHW ones only by float rounding (~1e-5 absolute).
    """
    import torch
    from cleanfid.inception_torchscript import InceptionV3W

    # Denormal floats made CPU training ~9x slower (docs/design.md §4); flushing them costs
    # nothing here and guards against the same on other CPUs.
    torch.set_flush_denormal(True)
    device = torch.device(device)
    path = Path(path) if path is not None else assets.inception_path()
    if path.name != assets.INCEPTION_NAME:
        # InceptionV3W takes a folder and appends this exact file name.
        raise ValueError(f"{path}: InceptionV3W loads a file named {assets.INCEPTION_NAME}; "
                         f"rename it or pass its folder's copy")
    try:
        with assets.quiet_jit():
            model = InceptionV3W(str(path.parent), download=False)
    except Exception as e:
        raise RuntimeError(f"could not load the Inception file {path} ({e}); delete it and run "
                           f"`python -m cmpipe.weights inception` to make it again") from e
    model = model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return InceptionExtractor(model, device, channels_last, path)


# --------------------------------------------------------------------------- inputs
def validate_images(images: Any, name: str = "images") -> np.ndarray:
    """Check that `images` is a uint8 numpy array N x H x W x C with C in {1, 3}."""
    if not isinstance(images, np.ndarray):
        kind = type(images).__module__ + "." + type(images).__name__
        raise TypeError(f"{name}: expected a numpy uint8 array N x H x W x C, got {kind}; "
                        f"convert it (a torch N x C x H x W tensor: x.permute(0, 2, 3, 1).numpy())")
    if images.dtype != np.uint8:
        raise TypeError(f"{name}: dtype is {images.dtype}, expected uint8 in [0, 255]; images in "
                        f"[-1, 1] become uint8 via ((x + 1) * 127.5).round().clip(0, 255)")
    if images.ndim != 4:
        raise ValueError(f"{name}: shape {images.shape} has {images.ndim} dimensions, expected 4 "
                         f"(N x H x W x C); a single gray image set needs a trailing channel axis")
    n, h, w, c = images.shape
    if c not in (1, 3):
        hint = ""
        if images.shape[1] in (1, 3):
            hint = "; it looks like N x C x H x W: transpose it with .transpose(0, 2, 3, 1)"
        raise ValueError(f"{name}: shape {images.shape} has {c} channels in the last axis, "
                         f"expected 1 or 3 (N x H x W x C){hint}")
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"{name}: shape {images.shape} holds no pixels")
    return images


def resize_clean(images: np.ndarray) -> np.ndarray:
    """clean-fid's 'clean' resize of uint8 N x H x W x {1,3}: float32 N x 299 x 299 x 3.

    Gray images repeat their channel first, as PIL's convert('RGB') does in
    clean-fid's folder loader; the resizer itself is clean-fid's.
    """
    from cleanfid.resize import build_resizer

    images = validate_images(images)
    resize = build_resizer(MODE)
    out = np.empty((len(images), INCEPTION_SIZE, INCEPTION_SIZE, 3), dtype=np.float32)
    for i, img in enumerate(images):
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        out[i] = resize(img)
    return out


def inception_features(images: np.ndarray, batch_size: int = 50, device: Any = "cpu",
                       progress: bool = True, model: InceptionExtractor | None = None,
                       desc: str = "inception") -> np.ndarray:
    """float32 N x 2048 Inception features of uint8 images N x H x W x C (C = 1 or 3).

    Equal, up to float rounding, to `cleanfid.fid.get_folder_features(..., mode='clean')`
    on the same images saved as PNG files. Pass `model` (from build_inception) to
    reuse a loaded network across calls; `device` is used only when model is None.
    """
    import torch
    from tqdm import tqdm

    images = validate_images(images)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r} must be a positive integer")
    if model is None:
        model = build_inception(device)
    n = len(images)
    feats = np.empty((n, FEATURE_DIM), dtype=np.float32)
    t0 = time.perf_counter()
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            chunk = images[start:start + batch_size]
            # N x 299 x 299 x 3 float32 -> N x 3 x 299 x 299 view: already channels-last in memory.
            x = torch.from_numpy(resize_clean(chunk)).permute(0, 3, 1, 2)
            out = model(x)
            if out.shape != (len(chunk), FEATURE_DIM):
                raise RuntimeError(f"Inception returned shape {tuple(out.shape)}, expected "
                                   f"({len(chunk)}, {FEATURE_DIM}); is {model.path} the right file?")
            feats[start:start + len(chunk)] = out.float().cpu().numpy()
            bar.update(len(chunk))
    dt = time.perf_counter() - t0
    log.info("%s: %d images in %.1f s (%.1f img/s)", desc, n, dt, n / max(dt, 1e-9))
    return feats


# --------------------------------------------------------------------------- metrics
def _validate_features(feats: Any, name: str, min_count: int = 2) -> np.ndarray:
    if not isinstance(feats, np.ndarray) or feats.ndim != 2:
        shape = getattr(feats, "shape", None)
        raise ValueError(f"{name}: expected a 2-D array N x D of features, got shape {shape}")
    if len(feats) < min_count:
        raise ValueError(f"{name}: {len(feats)} feature rows; at least {min_count} are needed "
                         f"(a covariance or an unbiased KID needs two samples)")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return feats


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64: the mean and the unbiased covariance (np.cov, as clean-fid)."""
    feats = _validate_features(feats, "features").astype(np.float64, copy=False)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of two Gaussians: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    The same quantity as clean-fid's `frechet_distance`, computed as
    Tr (S1 S2)^(1/2) = sum sqrt(eig(A S2 A)) with A = S1^(1/2) (both symmetric
    eigendecompositions): about 4 s for D = 2048 on two CPU cores instead of
    clean-fid's ~28 s with scipy's general `sqrtm` (tests check they agree).
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"FID statistics disagree in shape: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    w1, v1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    a = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T  # S1^(1/2), PSD
    m = a @ sigma2 @ a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(feats: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """FID of a feature set against reference statistics.

    With no more features than dimensions (n <= d: a set under 2,049 Inception features) the
    value is `fid_few`'s, the same formula without the d x d square roots (10 ms instead of
    about 4 s per set at d = 2048 on one core; equal to ~1e-9 relative).
    """
    feats = _validate_features(feats, "features")
    d = feats.shape[1]
    if len(feats) <= d:
        return fid_few(feats, mu_ref, sigma_ref)
    mu, sigma = feature_stats(feats)
    return fid_from_stats(mu, sigma, mu_ref, sigma_ref)


def fid_few(feats: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """FID of n << d features against reference statistics, exactly, in O(n^2 d + n d^2).

    With the sample covariance S = X^T X (X: n x d), S sigma_ref has the nonzero eigenvalues of
    X sigma_ref X^T (n x n, positive semi-definite), so tr sqrt(S sigma_ref) needs no d x d
    matrix square root.
    """
    feats = _validate_features(feats, "features").astype(np.float64)
    d = feats.shape[1]
    if np.shape(mu_ref) != (d,) or np.shape(sigma_ref) != (d, d):
        raise ValueError(f"FID statistics disagree in shape: features {feats.shape}, "
                         f"mu_ref {np.shape(mu_ref)}, sigma_ref {np.shape(sigma_ref)}")
    mu = feats.mean(axis=0)
    X = (feats - mu) / np.sqrt(len(feats) - 1)  # the unbiased covariance is X^T X
    m = X @ sigma_ref @ X.T
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    diff = mu - mu_ref
    return float(diff @ diff + np.sum(X * X) + np.trace(sigma_ref) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


def fid_few_of_rows(feats: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray):
    """`fid_few` of feats[rows] for many row draws (a bootstrap): returns rows -> FID, with
    F sigma_ref computed once. For rows r, X sigma_ref X^T = (G_r - mean G_r)(F_r - mean F_r)^T / (n - 1)
    with G = F sigma_ref; `rows` must hold len(feats) indices (a resample of the same size)."""
    f = _validate_features(feats, "features").astype(np.float64)
    g, const, n = f @ sigma_ref, np.trace(sigma_ref), len(f)

    def fid_rows(rows: np.ndarray) -> float:
        if len(rows) != n:
            raise ValueError(f"fid_few_of_rows: a resample of {n} rows is expected, got {len(rows)}")
        fr, gr = f[rows], g[rows]
        mu = fr.mean(axis=0)
        x, gx = fr - mu, gr - gr.mean(axis=0)
        m = gx @ x.T / (n - 1)
        lam = np.linalg.eigvalsh((m + m.T) / 2)
        diff = mu - mu_ref
        return diff @ diff + np.sum(x * x) / (n - 1) + const - 2 * np.sqrt(np.clip(lam, 0, None)).sum()
    return fid_rows


@contextmanager
def _numpy_global_seed(seed: int):
    # clean-fid's kernel_distance draws its subsets from numpy's global RNG; seed it so
    # that KID is reproducible (a DVC metric must not change on a rerun), then put the
    # caller's RNG state back.
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def kid(feats: np.ndarray, ref_feats: np.ndarray, num_subsets: int = 100,
        max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID (unbiased MMD^2, cubic polynomial kernel) with clean-fid's `kernel_distance`.

    Each of `num_subsets` draws takes m = min(len(feats), len(ref_feats), max_subset_size)
    rows of each set without replacement; the result is their mean. Deterministic for a seed.
    """
    from cleanfid.fid import kernel_distance

    feats = _validate_features(feats, "features")
    ref_feats = _validate_features(ref_feats, "reference features")
    if feats.shape[1] != ref_feats.shape[1]:
        raise ValueError(f"feature dimensions differ: {feats.shape[1]} vs reference {ref_feats.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets = {num_subsets} must be at least 1")
    if max_subset_size < 2:
        raise ValueError(f"max_subset_size = {max_subset_size} must be at least 2")
    with _numpy_global_seed(seed):
        return float(kernel_distance(feats, ref_feats, num_subsets=num_subsets,
                                     max_subset_size=max_subset_size))


# --------------------------------------------------------------------------- reference files
def save_reference(path: str | Path, features: np.ndarray, protocol: dict) -> dict:
    """Write reference features, their (mu, sigma) and the protocol (JSON) to an .npz."""
    features = _validate_features(features, "reference features")
    mu, sigma = feature_stats(features)
    atomic_savez(path, features=features, mu=mu, sigma=sigma,
                  protocol=np.array(json.dumps(protocol, sort_keys=True)))
    return {"features": features, "mu": mu, "sigma": sigma, "protocol": protocol}


def load_reference(path: str | Path) -> dict:
    """Read a file written by save_reference: features, mu, sigma and protocol (a dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the fid_ref stage first (`dvc repro fid_ref`)")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("features", "mu", "sigma", "protocol") if k not in z.files]
        if missing:
            raise ValueError(f"{path} lacks {missing}; it was not written by the fid_ref stage: "
                             f"rerun it (`dvc repro -f fid_ref`)")
        ref = {k: z[k] for k in ("features", "mu", "sigma")}
        ref["protocol"] = json.loads(str(z["protocol"]))
    return ref
