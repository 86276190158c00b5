"""The teacher denoiser D(x; σ), whatever its origin.

A teacher file (data/teacher/model.pt, networks.save_model format) is one of two kinds:

* "edm_teacher": a UNet2DModel trained by this pipeline, wrapped as cm.precond.EDMDenoiser.
* "ddpm_teacher": an ε-prediction UNet2DModel adopted from a diffusers directory
  (`adopt_diffusers_teacher`), wrapped as cm.precond.DiffusersEpsTeacher; its meta holds
  the scheduler's ᾱ_t, which define its noise levels σ_t = sqrt((1 - ᾱ_t)/ᾱ_t).

Either way `load_teacher` gives a frozen module with the call D(x, sigma, class_labels=None).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from cmpipe.cm.precond import DiffusersEpsTeacher, EDMDenoiser
from cmpipe.models.diffusers_dir import is_diffusers_dir, load_diffusers_teacher
from cmpipe.models.networks import CheckpointError, build_unet, load_network, save_model
from cmpipe.errors import ParamsError

TEACHER_KINDS = ("edm_teacher", "ddpm_teacher")
log = logging.getLogger(__name__)


def _json_like(value, where: str):
    """A copy of a config value with tuples as lists; anything else non-JSON is an error, since
    dropping it would rebuild a different network."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_like(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_like(v, f"{where}.{k}") for k, v in value.items()}
    raise CheckpointError(f"the UNet config value {where} = {value!r} is not JSON-like; cannot save it")


def _unet_dict(unet: nn.Module) -> dict:
    return {k: _json_like(v, k) for k, v in dict(unet.config).items() if not k.startswith("_")}


def _image_size(sample_size) -> tuple[int, int] | None:
    if sample_size is None:
        return None
    if isinstance(sample_size, (list, tuple)):
        return int(sample_size[0]), int(sample_size[-1])
    return int(sample_size), int(sample_size)


def adopt_diffusers_teacher(directory, out_path, shape) -> Path:
    """Save the diffusers ε-teacher in `directory` (unet/ + scheduler/) as a "ddpm_teacher" file.

    shape: (C, H, W) of the shards; the UNet's in_channels and sample_size must fit it (a
    ParamsError naming teacher.checkpoint otherwise). Loading is offline; the file is written
    atomically and checked to rebuild before it is published.
    """
    directory, out_path = Path(directory), Path(out_path)
    c, h, w = (int(s) for s in shape)
    teacher = load_diffusers_teacher(directory)
    unet_cfg = _unet_dict(teacher.unet)
    size = _image_size(unet_cfg.get("sample_size"))
    if unet_cfg.get("in_channels") != c or (size is not None and size != (h, w)):
        have = "x".join(str(s) for s in size) if size is not None else "any size"
        raise ParamsError(f"teacher.checkpoint {directory} is a UNet for {unet_cfg.get('in_channels')}-channel "
                          f"{have} images, but the shards hold {c}x{h}x{w} (C x H x W) images")
    if size is None:  # fully convolutional; record the size the rest of the pipeline checks against
        unet_cfg["sample_size"] = h if h == w else [h, w]
    weights = teacher.unet.state_dict()
    # Fail here, not in a later stage, if the saved config does not rebuild these weights.
    try:
        build_unet(unet_cfg).load_state_dict(weights)
    except (TypeError, RuntimeError) as e:
        raise CheckpointError(f"teacher.checkpoint {directory}: its UNet config does not rebuild "
                              f"its weights: {e}") from None
    meta = {"alphas_cumprod": [float(a) for a in teacher.alphas_cumprod],
            "adopted_from": str(directory), "prediction_type": "epsilon"}
    save_model(out_path, "ddpm_teacher", unet_cfg, {"ema": weights}, meta)
    return out_path


def load_teacher_file(path) -> tuple[nn.Module, dict]:
    """The raw UNet of a teacher file (its "ema" weights) and the file's content."""
    return load_network(path, TEACHER_KINDS)


def load_teacher(path, sigma_data: float, device=None) -> nn.Module:
    """The frozen denoiser D(x, sigma, class_labels=None) of a teacher file of either kind.

    sigma_data is used by "edm_teacher" only (a DDPM teacher's scaling comes from its ᾱ_t).
    """
    net, ckpt = load_teacher_file(path)
    if ckpt["kind"] == "edm_teacher":
        teacher = EDMDenoiser(net, sigma_data)
    else:
        meta = ckpt.get("meta", {})
        if meta.get("prediction_type", "epsilon") != "epsilon":
            raise CheckpointError(f"{path}: prediction_type {meta.get('prediction_type')!r}; "
                                  f"only 'epsilon' teachers are supported")
        if "alphas_cumprod" not in meta:
            raise CheckpointError(f"{path} is a ddpm_teacher without meta.alphas_cumprod")
        try:
            teacher = DiffusersEpsTeacher(net, meta["alphas_cumprod"])
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    teacher.eval().requires_grad_(False)
    return teacher.to(device) if device is not None else teacher


def adopt_teacher(checkpoint, out_path, shape, sigma_data: float, device=None) -> nn.Module:
    """Adopt `checkpoint` (params teacher.checkpoint) as the teacher at `out_path`, training nothing,
    and return its denoiser: a diffusers ε-prediction directory is saved as a "ddpm_teacher" file;
    a teacher file of this pipeline is copied with `adopted_from` in its meta, once its image size
    is checked against the shards' `shape` (C, H, W)."""
    out_path = Path(out_path)
    if is_diffusers_dir(checkpoint):
        adopt_diffusers_teacher(checkpoint, out_path, shape)
        teacher = load_teacher(out_path, sigma_data, device)
        log.info("adopted the diffusers ε-teacher %s (%d DDPM levels, sigma %.4g..%.4g) as %s; no training",
                 checkpoint, teacher.num_train_timesteps, teacher.sigma_min, teacher.sigma_max, out_path)
        return teacher
    net, ckpt = load_network(checkpoint, ("edm_teacher",))
    c, h = int(shape[0]), int(shape[1])
    if [ckpt["unet"]["in_channels"], ckpt["unet"]["sample_size"]] != [c, h]:
        raise ParamsError(f"teacher.checkpoint {checkpoint} is for {ckpt['unet']['in_channels']}x"
                          f"{ckpt['unet']['sample_size']}^2 images, the shards hold {c}x{h}x{shape[2]}")
    log.info("adopting the teacher %s; no training", checkpoint)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_model(out_path, "edm_teacher", ckpt["unet"], ckpt["weights"], dict(ckpt["meta"], adopted_from=checkpoint))
    teacher = EDMDenoiser(net, sigma_data).eval()
    return teacher.to(device) if device is not None else teacher
