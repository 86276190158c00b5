"""The diffusers round trip: export to ConsistencyModelPipeline, a DDPM ε-teacher as an EDM
denoiser, and the `python -m cmpipe.export.generate` command. Tiny UNets; the file runs in well
under a minute on two CPU cores."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_ddpm_dir, tiny_unet
from PIL import Image

from cmpipe.models import networks
from cmpipe.cm.karras import Sigmas, heun_step
from cmpipe.cm.precond import ConsistencyFunction, DiffusersEpsTeacher
from cmpipe.cm.sampling import consistency_sample
from cmpipe.export.diffusers import (
    DiffusersFormatError,
    diffusers_default_ts,
    diffusers_timesteps_to_ts,
    export_consistency_model,
    load_consistency_dir,
    load_diffusers_teacher,
    resolve_sigmas,
    ts_to_diffusers_timesteps,
)
from cmpipe.export.generate import main as generate_main
from cmpipe.models.networks import CheckpointError, load_network
from cmpipe.sampling.sets import cm_sampler, generate

ROOT = Path(__file__).resolve().parents[1]
SIG = Sigmas(num_scales=5)  # a small grid: ts [0, 2] is a real 2-step sampler
RES = 8


def _save_cm(path: Path, channels: int, seed: int = 0) -> Path:
    cfg, net = tiny_unet(channels, seed)
    sd = net.state_dict()
    networks.save_model(path, "consistency", cfg, {"ema": sd, "model": sd, "target": sd},
                        {"sigma_data": 0.5, "sigma_min": 0.002})
    return path


@pytest.fixture(scope="module")
def cm(tmp_path_factory):
    """{channels: (model file, exported directory)} for a gray and an RGB model."""
    d = tmp_path_factory.mktemp("cm")
    out = {}
    for c in (1, 3):
        model = _save_cm(d / f"model{c}.pt", c, seed=c)
        exported = export_consistency_model(model, d / f"export{c}", sigmas=SIG,
                                            sample_ts={2: [0, 2]})
        out[c] = (model, exported)
    return out


@pytest.fixture(scope="module")
def params_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("params") / "params.yaml"
    p.write_text("diffusion:\n  sigma_min: 0.002\n  sigma_max: 80.0\n  sigma_data: 0.5\n"
                 "  rho: 7.0\n  num_scales: 5\n")
    return p


def _pipeline(directory):
    from diffusers import ConsistencyModelPipeline

    pipe = ConsistencyModelPipeline.from_pretrained(directory, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(model_file):
    net, _ = load_network(model_file, ("consistency",), which="ema")
    return ConsistencyFunction(net, 0.5, 0.002).eval()


# --- export ----------------------------------------------------------------------------------

def test_timesteps_mapping():
    assert ts_to_diffusers_timesteps([0, 11], 18) == [11, 0]
    assert ts_to_diffusers_timesteps([0], 18) == [0]
    assert diffusers_timesteps_to_ts([17, 8, 0], 18) == [0, 8, 17]
    assert diffusers_default_ts(2, 18) == [0, 9] and diffusers_default_ts(3, 40) == [0, 13, 26]
    for bad in ([0, 18], [3, 5], [0, 5, 5], []):
        with pytest.raises(ValueError, match="must start at 0"):
            ts_to_diffusers_timesteps(bad, 18)
    # the scheduler visits exactly our grid's sigmas for those timesteps
    from diffusers import CMStochasticIterativeScheduler

    sched = CMStochasticIterativeScheduler(num_train_timesteps=18)
    sched.set_timesteps(timesteps=ts_to_diffusers_timesteps([0, 5, 11], 18))
    grid = Sigmas().grid()
    want = torch.tensor([grid[0], grid[5], grid[11], 0.002], dtype=torch.float32)
    assert torch.equal(sched.sigmas, want)


def test_export_layout_and_config(cm):
    d = cm[1][1]
    assert (d / "model_index.json").is_file() and (d / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    cfg = json.loads((d / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "CMStochasticIterativeScheduler"
    assert {k: cfg[k] for k in ("num_train_timesteps", "sigma_min", "sigma_max", "sigma_data", "rho")} == \
        {"num_train_timesteps": 5, "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "rho": 7.0}
    assert cfg["s_noise"] == 1.0 and cfg["clip_denoised"] is True
    assert json.loads((d / "model_index.json").read_text())["_class_name"] == "ConsistencyModelPipeline"
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    _, sig, info = load_consistency_dir(d)
    assert sig == SIG and info["which"] == "ema" and info["sample_ts"] == {"2": [0, 2]}


@pytest.mark.parametrize("ts", [[0], [0, 2], [0, 1, 3]])
def test_pipeline_matches_our_sampler_rgb_latents(cm, ts):
    """RGB: the pipeline gets our initial noise as `latents=` and per-sample generators whose
    draws (the re-noising) our sampler replays."""
    model, d = cm[3]
    pipe, f, b = _pipeline(d), _ours(model), 3
    noise = torch.randn(b, 3, RES, RES, generator=torch.Generator().manual_seed(5))
    gens = [torch.Generator().manual_seed(100 + i) for i in range(b)]
    out = pipe(batch_size=b, num_inference_steps=None, timesteps=ts_to_diffusers_timesteps(ts, 5),
               latents=noise.clone(), generator=gens, output_type="pt").images * 2 - 1
    replay = [torch.Generator().manual_seed(100 + i) for i in range(b)]
    ours = consistency_sample(f, noise, SIG, ts, lambda k: torch.cat(
        [torch.randn((1, 3, RES, RES), generator=g) for g in replay]))
    assert ours.abs().max() > 0.05  # not a degenerate comparison
    assert (out - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize("ts", [[0], [0, 2]])
def test_pipeline_matches_our_sampler_gray(cm, ts):
    """Gray: diffusers' pipeline refuses 1-channel `latents=` (it expects 3 channels), so the
    initial noise too comes from the generators, and our sampler replays the same draws."""
    model, d = cm[1]
    pipe, f, b = _pipeline(d), _ours(model), 4
    gens = [torch.Generator().manual_seed(200 + i) for i in range(b)]
    out = pipe(batch_size=b, num_inference_steps=None, timesteps=ts_to_diffusers_timesteps(ts, 5),
               generator=gens, output_type="pt").images * 2 - 1
    replay = [torch.Generator().manual_seed(200 + i) for i in range(b)]
    draw = lambda *_: torch.cat([torch.randn((1, 1, RES, RES), generator=g) for g in replay])
    ours = consistency_sample(f, draw(), SIG, ts, draw)
    assert (out - ours).abs().max().item() <= 1e-5


def test_pipeline_num_inference_steps_is_diffusers_default_ts(cm):
    model, d = cm[3]
    pipe, f = _pipeline(d), _ours(model)
    noise = torch.randn(2, 3, RES, RES, generator=torch.Generator().manual_seed(9))
    gens = [torch.Generator().manual_seed(300 + i) for i in range(2)]
    out = pipe(batch_size=2, num_inference_steps=2, latents=noise.clone(), generator=gens,
               output_type="pt").images * 2 - 1
    replay = [torch.Generator().manual_seed(300 + i) for i in range(2)]
    ours = consistency_sample(f, noise, SIG, diffusers_default_ts(2, 5), lambda k: torch.cat(
        [torch.randn((1, 3, RES, RES), generator=g) for g in replay]))
    assert (out - ours).abs().max().item() <= 1e-5


def test_export_is_atomic_and_checks_sigmas(cm, tmp_path, monkeypatch):
    model, existing = cm[1]
    before = sorted(p.name for p in existing.rglob("*"))
    with pytest.raises(FileExistsError, match="already exists"):
        export_consistency_model(model, existing, sigmas=SIG)
    assert sorted(p.name for p in existing.rglob("*")) == before

    with pytest.raises(CheckpointError, match="sigma_data = 0.5"):
        export_consistency_model(model, tmp_path / "bad", sigmas=Sigmas(sigma_data=0.4, num_scales=5))
    with pytest.raises(CheckpointError, match="not found"):
        export_consistency_model(tmp_path / "nope.pt", tmp_path / "x", sigmas=SIG)
    with pytest.raises(CheckpointError, match="no 'teacher' weights"):
        export_consistency_model(model, tmp_path / "x", which="teacher", sigmas=SIG)

    import cmpipe.export.diffusers as dio

    def broken(*a, **k):
        raise RuntimeError("simulated crash while writing")
    monkeypatch.setattr(dio, "_verify_export", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        export_consistency_model(model, tmp_path / "half", sigmas=SIG)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory
    monkeypatch.undo()
    # overwrite replaces an exported directory, and only that
    out = export_consistency_model(model, tmp_path / "again", sigmas=SIG)
    export_consistency_model(model, out, sigmas=SIG, overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="refusing"):
        export_consistency_model(model, tmp_path / "mine", sigmas=SIG, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_resolve_sigmas():
    meta = {"sigma_data": 0.5, "sigma_min": 0.002}
    assert resolve_sigmas(meta) == Sigmas()
    assert resolve_sigmas(meta, {"num_scales": 40}) == Sigmas(num_scales=40)
    assert resolve_sigmas({**meta, "num_scales": 40, "rho": 5.0}) == Sigmas(rho=5.0, num_scales=40)
    with pytest.raises(CheckpointError, match="sigma_min"):
        resolve_sigmas(meta, {"sigma_min": 0.01})


# --- the diffusers ε-teacher -------------------------------------------------------------

@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    return save_ddpm_dir(tmp_path_factory.mktemp("ddpm") / "teacher", seed=7)


def test_teacher_equals_direct_eps_call(ddpm_dir):
    from diffusers import DDPMScheduler, UNet2DModel

    D = load_diffusers_teacher(ddpm_dir)
    unet = UNet2DModel.from_pretrained(ddpm_dir, subfolder="unet", local_files_only=True).eval()
    ac = DDPMScheduler.from_pretrained(ddpm_dir, subfolder="scheduler").alphas_cumprod.double()
    want_sigmas = ((1 - ac) / ac).sqrt()
    assert torch.allclose(D.sigmas.double(), want_sigmas, rtol=1e-6)
    assert D.num_train_timesteps == 1000 and D.sigma_min < 0.011 and D.sigma_max > 150

    t = torch.tensor([0, 1, 250, 998, 999])
    sigma = D.sigmas[t]  # the scheduler's own noise levels, one per sample
    assert torch.equal(D.timestep(sigma), t.double())
    x = torch.randn(len(t), 1, RES, RES, generator=torch.Generator().manual_seed(1)) * sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        eps = unet(x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt(), t).sample
        got = D(x, sigma)
    assert (got - (x - sigma.view(-1, 1, 1, 1) * eps)).abs().max().item() <= 1e-5
    with torch.no_grad():  # a scalar sigma is broadcast
        assert torch.allclose(D(x[:2], sigma[2]), D(x[:2], sigma[2].expand(2)))


def test_teacher_interpolates_and_clamps(ddpm_dir):
    from diffusers import UNet2DModel

    D = load_diffusers_teacher(ddpm_dir)
    unet = UNet2DModel.from_pretrained(ddpm_dir, subfolder="unet", local_files_only=True).eval()
    i = 400
    lo, hi = D.sigmas[i].double(), D.sigmas[i + 1].double()
    sigma = (lo * hi).sqrt().float()  # halfway in ln sigma
    t = D.timestep(sigma.view(1)).item()
    assert i < t < i + 1 and abs(t - (i + 0.5)) < 1e-3
    x = torch.randn(1, 1, RES, RES, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x_in = x / (1 + sigma**2).sqrt()
        e = {s: unet(x_in, torch.tensor([s], dtype=torch.float32)).sample for s in (float(i), t, float(i + 1))}
        got = D(x, sigma.view(1))
    # UNet2DModel takes the fractional time step as it is (a float tensor is not truncated) ...
    assert (e[t] - e[float(i)]).abs().max() > 0 and (e[t] - e[float(i + 1)]).abs().max() > 0
    assert (got - (x - sigma * e[t])).abs().max().item() <= 1e-5
    # between two adjacent levels the time step goes from i to i + 1, linearly in ln sigma
    # (the network's output itself need not be monotone in t: its time embedding is sinusoidal)
    sweep = torch.exp(torch.linspace(0, 1, 11, dtype=torch.float64) * (hi.log() - lo.log()) + lo.log())
    ts_sweep = D.timestep(sweep)
    assert torch.allclose(ts_sweep, i + torch.linspace(0, 1, 11, dtype=torch.float64), atol=1e-6)
    # outside the model's levels the time step is the end point's
    assert D.timestep(torch.tensor([1e-4, D.sigma_min])).tolist() == [0.0, 0.0]
    assert D.timestep(torch.tensor([1e4, D.sigma_max])).tolist() == [999.0, 999.0]
    # it is a denoiser for karras.heun_step, frozen and in eval mode
    with torch.no_grad():
        y = heun_step(D, x.expand(3, -1, -1, -1) * 80, torch.full((3,), 80.0), torch.full((3,), 40.0))
    assert y.shape == (3, 1, RES, RES) and torch.isfinite(y).all()
    D.train()
    assert not D.training and not D.unet.training
    assert not any(p.requires_grad for p in D.parameters())


def test_teacher_errors(ddpm_dir, tmp_path):
    import shutil

    missing = tmp_path / "no_such_teacher"
    with pytest.raises(DiffusersFormatError, match=str(missing)):
        load_diffusers_teacher(missing)
    for part in ("unet", "scheduler"):
        d = tmp_path / f"without_{part}"
        shutil.copytree(ddpm_dir, d)
        shutil.rmtree(d / part)
        with pytest.raises(DiffusersFormatError, match=f"{d}.*no {part}/"):
            load_diffusers_teacher(d)
    d = tmp_path / "vpred"
    shutil.copytree(ddpm_dir, d)
    cfg_path = d / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    with pytest.raises(DiffusersFormatError, match="prediction_type is 'v_prediction'"):
        load_diffusers_teacher(d)
    (d / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(DiffusersFormatError, match="cannot load the UNet2DModel"):
        load_diffusers_teacher(d)
    with pytest.raises(ValueError, match="decreasing"):
        DiffusersEpsTeacher(load_diffusers_teacher(ddpm_dir).unet, torch.tensor([0.5, 0.9]))


def test_loading_makes_no_network_access(ddpm_dir, cm, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("network access while loading a local directory")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    load_diffusers_teacher(ddpm_dir)
    _pipeline(cm[1][1])
    load_consistency_dir(cm[1][1])


# --- python -m cmpipe.export.generate ---------------------------------------------------------------

def _pngs(d: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(d.glob("[0-9]*.png"))]


def test_generate_command(cm, params_file, tmp_path):
    model, exported = cm[1]
    common = ["--count", "5", "--batch-size", "2", "--params", str(params_file)]
    generate_main(["--model", str(model), "--ts", "0,2", "--seed", "7", "--out", str(tmp_path / "a"), *common])
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == [f"{i:06d}.png" for i in range(5)] + ["generate.json", "grid.png"]
    a = _pngs(tmp_path / "a")
    assert a[0].shape == (RES, RES) and a[0].dtype == np.uint8

    # the sample stage's images: sampling.generate with cm_sampler, same seed and batch size
    f = _ours(model)
    want, _ = generate(cm_sampler(f, SIG, [0, 2], 7, (1, RES, RES)), 5, 2, (1, RES, RES), 7,
                       torch.device("cpu"), "test")
    assert np.array_equal(np.stack(a), want[..., 0])

    # same seed, same images (also from the exported directory); another seed, others
    generate_main(["--model", str(model), "--steps", "2", "--seed", "7", "--out", str(tmp_path / "b"), *common])
    generate_main(["--model", str(exported), "--ts", "0,2", "--seed", "7", "--out", str(tmp_path / "c"), *common])
    generate_main(["--model", str(model), "--ts", "0,2", "--seed", "8", "--out", str(tmp_path / "d"), *common])
    b, c, d = _pngs(tmp_path / "b"), _pngs(tmp_path / "c"), _pngs(tmp_path / "d")
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(b) == 5
    assert max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(a, c)) <= 1
    assert not np.array_equal(np.stack(a), np.stack(d))
    grid = np.asarray(Image.open(tmp_path / "a" / "grid.png"))
    assert grid.ndim == 2 and grid.shape[0] > RES
    assert json.loads((tmp_path / "a" / "generate.json").read_text())["ts"] == [0, 2]
    # --overwrite replaces a previous run's folder
    generate_main(["--model", str(model), "--seed", "8", "--ts", "0,2", "--out", str(tmp_path / "a"),
                   "--overwrite", *common])
    assert all(np.array_equal(x, y) for x, y in zip(_pngs(tmp_path / "a"), d))


def test_generate_errors(cm, params_file, tmp_path):
    model, exported = cm[1]
    out = ["--out", str(tmp_path / "o"), "--params", str(params_file)]
    cases = [
        (["--model", str(tmp_path / "missing.pt")], "missing.pt not found"),
        (["--model", str(model), "--class", "3"], "this model is not class-conditional"),
        (["--model", str(exported), "--class", "0"], "this model is not class-conditional"),
        (["--model", str(model), "--ts", "0,7"], r"at most 4 \(the last index of the 5-point grid"),
        (["--model", str(model), "--ts", "2,3"], "must start at 0"),
        (["--model", str(model), "--ts", "0,x"], "grid indices separated by commas"),
        (["--model", str(model), "--steps", "9"], "must be in 1..4"),
        (["--model", str(model), "--count", "0"], "--count 0"),
        (["--model", str(tmp_path)], "not an exported diffusers model"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit, match=msg):
            generate_main(argv + out)
    assert not (tmp_path / "o").exists()
    (tmp_path / "o").mkdir()
    with pytest.raises(SystemExit, match="already exists"):
        generate_main(["--model", str(model)] + out)


def test_generate_subprocess_offline(cm, tmp_path):
    """`python -m cmpipe.export.generate` on an exported directory with the hub offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "gen"
    r = subprocess.run([sys.executable, "-m", "cmpipe.export.generate", "--model", str(cm[3][1]), "--steps", "2",
                        "--count", "3", "--seed", "1", "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "000002.png", "grid.png"]
    assert np.asarray(Image.open(out / "000000.png")).shape == (RES, RES, 3)
    assert json.loads((out / "generate.json").read_text())["ts"] == [0, 2]  # the export's recorded ts
    r = subprocess.run([sys.executable, "-m", "cmpipe.export.generate", "--model", str(tmp_path / "nope.pt"),
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 1 and "generate: model" in r.stderr and "not found" in r.stderr


def test_teacher_loads_with_hub_offline(ddpm_dir):
    code = ("import torch; from cmpipe.export.diffusers import load_diffusers_teacher as L; "
            f"D = L({str(ddpm_dir)!r}); x = torch.zeros(2, 1, {RES}, {RES}); "
            "print(tuple(D(x, torch.tensor([0.5, 5.0])).shape))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(f"(2, 1, {RES}, {RES})")


def test_export_command(cm, params_file, tmp_path):
    from cmpipe.export.diffusers import main as export_main

    out = tmp_path / "exported"
    export_main(["export", str(cm[1][0]), str(out), "--params", str(params_file)])
    _, sig, info = load_consistency_dir(out)
    assert sig == SIG and info["source"] == str(cm[1][0])
    with pytest.raises(SystemExit, match="already exists"):
        export_main(["export", str(cm[1][0]), str(out), "--params", str(params_file)])
    with pytest.raises(SystemExit, match="not found"):
        export_main(["export", str(tmp_path / "none.pt"), str(tmp_path / "y"), "--params", str(params_file)])
