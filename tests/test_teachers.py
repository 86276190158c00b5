"""cmpipe.models.teachers: a diffusers ε-teacher adopted as a "ddpm_teacher" file, and load_teacher for
both teacher kinds. Tiny UNets; a few seconds in all."""
from __future__ import annotations

import pytest
import torch
from conftest import save_ddpm_dir, tiny_unet

from cmpipe.models import networks
from cmpipe.cm.precond import DiffusersEpsTeacher, EDMDenoiser
from cmpipe.models.networks import CheckpointError
from cmpipe.pipeline.params import ParamsError
from cmpipe.models.teachers import adopt_diffusers_teacher, load_teacher, load_teacher_file

RES = 8


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    """A diffusers directory: an ε UNet2DModel (1 channel, 8x8) and a DDPMScheduler."""
    return save_ddpm_dir(tmp_path_factory.mktemp("ddpm") / "teacher", seed=3)


def test_adopt_then_load_equals_direct_eps_call(ddpm_dir, tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    out = adopt_diffusers_teacher(ddpm_dir, tmp_path / "teacher" / "model.pt", (1, RES, RES))
    assert out.is_file() and not [p for p in out.parent.iterdir() if p.name != "model.pt"]  # no temp files
    net, ckpt = load_teacher_file(out)
    assert ckpt["kind"] == "ddpm_teacher" and list(ckpt["weights"]) == ["ema"]
    assert not any(k.startswith("_") for k in ckpt["unet"])
    assert ckpt["unet"]["in_channels"] == 1 and ckpt["unet"]["sample_size"] == RES
    ac = DDPMScheduler.from_pretrained(ddpm_dir, subfolder="scheduler", local_files_only=True).alphas_cumprod
    meta = ckpt["meta"]
    assert meta["alphas_cumprod"] == [float(a) for a in ac]  # exactly, not rounded
    assert meta["adopted_from"] == str(ddpm_dir) and meta["prediction_type"] == "epsilon"

    D = load_teacher(out, sigma_data=0.5)
    assert isinstance(D, DiffusersEpsTeacher) and not D.training
    assert not any(p.requires_grad for p in D.parameters())
    unet = UNet2DModel.from_pretrained(ddpm_dir, subfolder="unet", local_files_only=True).eval()
    t = torch.tensor([0, 137, 999])
    sigma = ((1 - ac[t].double()) / ac[t].double()).sqrt().float()  # the scheduler's own σ_t
    s = sigma.view(-1, 1, 1, 1)
    x = torch.randn(len(t), 1, RES, RES, generator=torch.Generator().manual_seed(0)) * (1 + s)
    with torch.no_grad():
        eps = unet(x / (1 + s**2).sqrt(), t).sample
        got = D(x, sigma)
    assert (got - (x - s * eps)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="unconditional"):
        D(x, sigma, torch.zeros(len(t), dtype=torch.long))
    with torch.no_grad():
        assert torch.equal(D(x, sigma, None), got)


def test_adopt_shape_mismatch_names_teacher_checkpoint(ddpm_dir, tmp_path):
    out = tmp_path / "model.pt"
    for shape in [(3, RES, RES), (1, 16, 16)]:
        with pytest.raises(ParamsError, match=r"teacher\.checkpoint") as e:
            adopt_diffusers_teacher(ddpm_dir, out, shape)
        msg = str(e.value)
        assert str(ddpm_dir) in msg and f"1-channel {RES}x{RES}" in msg and "x".join(map(str, shape)) in msg
    assert not out.exists()


def test_load_teacher_edm_file(tmp_path):
    cfg, net = tiny_unet(1, seed=5)
    path = tmp_path / "edm.pt"
    networks.save_model(path, "edm_teacher", cfg, {"ema": net.state_dict(), "model": net.state_dict()},
                        {"sigma_data": 0.5})
    D = load_teacher(path, sigma_data=0.5)
    assert isinstance(D, EDMDenoiser) and D.sigma_data == 0.5 and not D.training
    assert not any(p.requires_grad for p in D.parameters())
    x = torch.randn(2, 1, RES, RES, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(D(x, torch.tensor([0.3, 3.0])), EDMDenoiser(net, 0.5)(x, torch.tensor([0.3, 3.0])))


def test_load_teacher_refuses_other_kinds(tmp_path):
    cfg, net = tiny_unet(1, seed=6)
    path = tmp_path / "cm.pt"
    sd = net.state_dict()
    networks.save_model(path, "consistency", cfg, {"ema": sd, "model": sd, "target": sd},
                        {"sigma_data": 0.5, "sigma_min": 0.002})
    with pytest.raises(CheckpointError, match="'consistency'"):
        load_teacher(path, sigma_data=0.5)
    with pytest.raises(CheckpointError, match="not found"):
        load_teacher(tmp_path / "missing.pt", sigma_data=0.5)
