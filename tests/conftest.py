import os
import sys
from pathlib import Path

# See stages/__init__.py: spinning OpenMP threads collapse throughput on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
# Reference files for tests, copied from ../shared/testdata so a clean clone has them
# (testdata/lpips: the LPIPS authors' example images, BSD-2-Clause, see its LICENSE).
TESTDATA = ROOT / "tests" / "data"
sys.path.insert(0, str(ROOT))


def tiny_unet(channels: int = 1, seed: int = 0, res: int = 8, num_classes: int | None = None):
    """(config, UNet2DModel) of a two-level 8/16-channel UNet with its weights moved away from
    the initialisation, so every weight (and the class embedding) matters in a comparison."""
    import torch

    from cmpipe import networks

    torch.manual_seed(seed)
    cfg = networks.unet_config([8, 16], 1, [], 0.0, res, channels, num_classes)
    net = networks.build_unet(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, net.eval()


def save_ddpm_dir(directory: Path, seed: int, channels: int = 1) -> Path:
    """A diffusers directory as published DDPM models are: an ε UNet2DModel and its DDPMScheduler."""
    from diffusers import DDPMScheduler

    _, net = tiny_unet(channels, seed)
    net.save_pretrained(directory / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(directory / "scheduler")
    return directory


class Boom:
    """Unpickling this would create a folder: the proof that nothing got unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))
