"""The raw network F: diffusers' UNet2DModel built from params' `model` section, and the model
files that hold it (the preconditioning around F is in cm/precond.py)."""
from __future__ import annotations

import math

import torch
from torch import nn

from cmpipe.errors import CheckpointError, ParamsError  # noqa: F401


def unet_config(block_out_channels, layers_per_block, attention_levels, dropout,
                resolution: int, channels: int, num_classes: int | None = None) -> dict:
    """Keyword arguments of diffusers' UNet2DModel for params.yaml's `model` section.

    With `num_classes` (model.class_conditional), the label enters through a learned class
    embedding added to the time embedding (UNet2DModel's `num_class_embeds`).
    """
    levels = len(block_out_channels)
    if levels < 1:
        raise ParamsError("params.yaml: model.block_out_channels must list at least one level, e.g. [32, 64]")
    if resolution % (2 ** (levels - 1)) != 0:
        raise ParamsError(f"params.yaml: model.block_out_channels has {levels} levels, which halve the resolution "
                          f"{levels - 1} times, but the images are {resolution}x{resolution}: "
                          f"use at most {1 + _halvings(resolution)} levels")
    bad = [a for a in attention_levels if not 0 <= a < levels]
    if bad:
        raise ParamsError(f"params.yaml: model.attention_levels {bad} are not levels of model.block_out_channels "
                          f"(0..{levels - 1})")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"a class-conditional model needs at least one class, got {num_classes}")
    config = dict(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=list(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=["AttnDownBlock2D" if i in attention_levels else "DownBlock2D"
                          for i in range(levels)],
        up_block_types=["AttnUpBlock2D" if i in attention_levels else "UpBlock2D"
                        for i in reversed(range(levels))],
        norm_num_groups=_norm_groups(block_out_channels),
        dropout=dropout,
        attention_head_dim=8,
    )
    if num_classes is not None:  # absent, not None, for unconditional models: their files stay as before
        config["num_class_embeds"] = int(num_classes)
    return config


def model_num_classes(class_conditional: bool, class_names: list) -> int | None:
    """The class count of a model to build (params model.class_conditional, the shards' classes)."""
    if not class_conditional:
        return None
    if not class_names:
        raise ParamsError("params.yaml: model.class_conditional is true but the shards' manifest lists no "
                          "classes; shard a labelled source or set model.class_conditional: false")
    return len(class_names)


def num_classes_of(unet: dict) -> int | None:
    """The number of classes of a saved UNet configuration; None when it is unconditional."""
    return unet.get("num_class_embeds")


def _halvings(n: int) -> int:
    k = 0
    while n % 2 == 0:
        n //= 2
        k += 1
    return k


def _norm_groups(channels) -> int:
    # The largest group count <= 32 that divides every level and leaves >= 4
    # channels per group at the first level (GroupNorm over 1 channel is unstable).
    g = math.gcd(*channels)
    cap = max(1, min(32, channels[0] // 4))
    return max(d for d in range(1, cap + 1) if g % d == 0)


def build_unet(config: dict) -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**config)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- saved models -------------------------------------------------------------
# A saved model is a dict of plain tensors and JSON-like values, read back with
# torch.load(weights_only=True): loading a checkpoint never runs code from it.

def save_model(path, kind: str, unet: dict, weights: dict, meta: dict | None = None):
    """Save `weights` (name -> state_dict, e.g. {"ema": ..., "model": ...}) atomically."""
    from cmpipe.util.fileio import atomic_save

    atomic_save({"format": "cmpipe-model-1", "kind": kind, "unet": unet,
                 "weights": {k: {n: t.detach().cpu() for n, t in sd.items()} for k, sd in weights.items()},
                 "meta": meta or {}}, path)


def read_model_file(path, kinds: tuple[str, ...]) -> dict:
    import os

    if not os.path.isfile(path):
        raise CheckpointError(f"model file {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read model file {path} ({type(e).__name__}: {e}); it is "
                              f"truncated, corrupt or not a model saved by this pipeline") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "cmpipe-model-1":
        raise CheckpointError(f"{path} is not a model saved by this pipeline (no 'cmpipe-model-1' format tag)")
    if ckpt.get("kind") not in kinds:
        raise CheckpointError(f"{path} holds a {ckpt.get('kind')!r} model; expected one of {list(kinds)}")
    return ckpt


def load_network(path, kinds: tuple[str, ...], which: str = "ema") -> tuple[nn.Module, dict]:
    """Build the UNet described in a saved model and load its `which` weights (strictly)."""
    ckpt = read_model_file(path, kinds)
    if which not in ckpt["weights"]:
        raise CheckpointError(f"{path} has no {which!r} weights (it has {list(ckpt['weights'])})")
    net = build_unet(ckpt["unet"])
    try:
        net.load_state_dict(ckpt["weights"][which])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit its network configuration: {e}") from None
    return net, ckpt
