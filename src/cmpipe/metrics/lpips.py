"""LPIPS v0.1, the learned perceptual image distance (Zhang et al. 2018), as a frozen torch module.

The computation is the ``lpips==0.1.4`` package's own; :mod:`cmpipe.weights.lpips` supplies its
weights offline. ``python -m cmpipe.metrics.lpips A.png B.png`` prints the distance of two images.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import lpips
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmpipe.weights.lpips import (
    BACKBONES,
    LPIPS_VERSION,
    LPIPSWeightsError,
    backbone_spec,
    backbone_weights,
    package_heads,
    package_heads_path,
)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance per sample (Zhang et al. 2018), frozen, differentiable in its inputs.

    At five layers of an ImageNet classifier the channel-normalised features of both images are
    subtracted, squared, weighted per channel by a learned 1x1 "linear head", averaged over
    space and summed; v0.1 first maps the [-1, 1] input with a fixed per-channel affine.
    The consistency-models paper uses it as the distance d of the consistency loss.

    forward(x, y): two N x C x H x W batches in [-1, 1], C = 1 (gray, repeated to RGB) or 3;
    returns N distances (float). Resizing: when ``resize`` is set and H or W is smaller than
    it, both batches are upsampled bilinearly to resize x resize (the consistency-models
    recipe: 28x28 or 32x32 images go to 224x224); images at least that large are used as
    they are, as are all images with resize=None (the authors' CLI behaviour). The threshold
    is ``resize`` itself, where openai/consistency_models (and docs/design.md §3.7) upsample images
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


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as a 1 x 3 x H x W RGB tensor in [-1, 1] (the authors' im2tensor: v/127.5 - 1)."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(rgb / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cmpipe.metrics.lpips",
        description="LPIPS v0.1 distance between two images (Zhang et al. 2018). "
                    "`python -m cmpipe.weights lpips` prepares the offline backbone weights.")
    parser.add_argument("images", nargs=2, metavar="IMAGE", help="two image files of the same size")
    parser.add_argument("--net", choices=sorted(BACKBONES), default="alex", help="backbone (default alex)")
    parser.add_argument("--resize", type=int, default=None,
                        help="upsample images smaller than N to NxN first (default: no resize, "
                             "as the authors' lpips_2imgs.py)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    a, b = (Path(p) for p in args.images)
    for p in (a, b):
        if not p.is_file():
            parser.error(f"{p}: no such file")
    x, y = load_image(a), load_image(b)
    if x.shape != y.shape:
        parser.error(f"the images differ in size: {a} is {x.shape[3]}x{x.shape[2]}, "
                     f"{b} is {y.shape[3]}x{y.shape[2]}")
    try:
        metric = load_lpips(args.net, resize=args.resize)
        with torch.no_grad():
            d = metric(x, y).item()
    except (LPIPSWeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Distance: {d:.3f}")
    return 0


if __name__ == "__main__":  # run with -m: this file shares its name with the lpips package it imports
    sys.exit(main())
