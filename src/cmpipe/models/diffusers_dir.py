"""Reading diffusers directories: a UNet2DModel saved with `save_pretrained`, and an ε-prediction
teacher (`unet/` + a DDPMScheduler's `scheduler/`) adopted as an EDM denoiser (cm.precond's
DiffusersEpsTeacher). Offline: nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

from cmpipe.cm.precond import DiffusersEpsTeacher
from cmpipe.models.networks import CheckpointError


class DiffusersFormatError(CheckpointError):
    """A diffusers directory is missing, incomplete, or of a kind this pipeline cannot use."""


def is_diffusers_dir(path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "model_index.json").is_file() or (p / "unet").is_dir())


def require_subdir(directory: Path, sub: str, config_name: str, what: str):
    if not directory.is_dir():
        raise DiffusersFormatError(f"diffusers directory {directory} not found")
    if not (directory / sub).is_dir():
        raise DiffusersFormatError(f"{directory} has no {sub}/ folder; expected {sub}/{config_name} "
                                   f"({what}, as written by save_pretrained)")
    if not (directory / sub / config_name).is_file():
        raise DiffusersFormatError(f"{directory / sub} has no {config_name} ({what})")


def load_unet(directory: Path, device=None):
    from diffusers import UNet2DModel

    require_subdir(directory, "unet", "config.json", "a UNet2DModel config and weights")
    try:
        cfg = json.loads((directory / "unet" / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise DiffusersFormatError(f"cannot read {directory / 'unet' / 'config.json'}: {e}") from None
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise DiffusersFormatError(f"{directory / 'unet'} holds a {cfg.get('_class_name')}; "
                                   f"only UNet2DModel (unconditional images) is supported")
    try:
        # low_cpu_mem_usage=False: the default needs `accelerate` and warns at every load without it
        unet = UNet2DModel.from_pretrained(directory, subfolder="unet", local_files_only=True,
                                           low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise DiffusersFormatError(f"cannot load the UNet2DModel of {directory / 'unet'} "
                                   f"(missing or mismatched weights?): {e}") from None
    unet.requires_grad_(False).eval()
    return unet.to(device) if device is not None else unet



def load_diffusers_teacher(directory, device=None) -> DiffusersEpsTeacher:
    """Load `directory`/unet (UNet2DModel, ε) and `directory`/scheduler (DDPMScheduler) offline."""
    from diffusers import DDPMScheduler

    directory = Path(directory)
    if not directory.is_dir():
        raise DiffusersFormatError(f"diffusers teacher directory {directory} not found")
    require_subdir(directory, "unet", "config.json", "the ε-prediction UNet2DModel")
    require_subdir(directory, "scheduler", "scheduler_config.json", "the DDPMScheduler giving the betas")
    try:
        raw = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as e:
        raise DiffusersFormatError(f"cannot read {directory / 'scheduler' / 'scheduler_config.json'}: {e}") from None
    pred = raw.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise DiffusersFormatError(f"{directory / 'scheduler'}: prediction_type is {pred!r}; only "
                                   f"'epsilon' models can be adopted as a teacher")
    try:
        sched = DDPMScheduler.from_pretrained(directory, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, NotImplementedError) as e:
        raise DiffusersFormatError(f"cannot read the scheduler of {directory}: {e}") from None
    unet = load_unet(directory)
    try:
        teacher = DiffusersEpsTeacher(unet, sched.alphas_cumprod)
    except ValueError as e:
        raise DiffusersFormatError(f"{directory}: {e}") from None
    return teacher.to(device) if device is not None else teacher
