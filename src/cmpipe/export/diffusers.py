"""Round trips with diffusers: export a consistency model, adopt an ε-prediction teacher.

Export (`export_consistency_model`)
    A consistency model saved by the pipeline (data/student/model.pt) becomes a directory that
    `diffusers.ConsistencyModelPipeline.from_pretrained(dir)` loads offline: `unet/` (the
    UNet2DModel, safetensors), `scheduler/` (CMStochasticIterativeScheduler) and
    `model_index.json`, plus `cmpipe.json` (where it came from; diffusers ignores it).

    The conventions agree term by term (checked against diffusers 0.42.1, and by the tests
    numerically):

    ==================  ===========================================  ======================================
    term                this pipeline (networks.py, sampling.py)     CMStochasticIterativeScheduler/pipeline
    ==================  ===========================================  ======================================
    input scaling       c_in x, c_in = 1/sqrt(s^2 + sd^2)            scale_model_input: x / sqrt(s^2 + sd^2)
    time input          c_noise = 250 ln(s + 1e-44)                  sigma_to_t = 1000*0.25*ln(s + 1e-44)
    c_skip, c_out       sd^2/((s-eps)^2+sd^2), (s-eps)sd/sqrt(s^2+sd^2)  get_scalings_for_boundary_condition
                                                                     (eps = sigma_min): the same
    clip                x0.clamp(-1, 1)                              clip_denoised=True
    re-noise            x0 + sqrt(s_next^2 - eps^2) z                x0 + s_noise z sqrt(s_next^2 - eps^2),
                                                                     s_noise = 1
    grid                Karras, N points, index 0 = sigma_max        _convert_to_karras(ramp), ramp = i/(N-1)
    initial x           sigma_max z                                  latents * init_noise_sigma (= sigma_max)
    ==================  ===========================================  ======================================

    Time steps: the pipeline's `timesteps=[...]` are *our grid indices in decreasing order*:
    `set_timesteps(timesteps=T)` reverses T, divides by N-1 (N = num_train_timesteps) and maps
    the ramp through the Karras formula, so the sampler visits sigma_{T[-1]}, ..., sigma_{T[0]}.
    Our ts = [0, 11] (N = 18) is `timesteps=[11, 0]` (`ts_to_diffusers_timesteps`).
    `num_inference_steps=K` instead means ts = [0, N//K, 2(N//K), ...] (`diffusers_default_ts`),
    which differs from this pipeline's `default_ts` (round(i (N-1)/K)).

    Two limits of diffusers' ConsistencyModelPipeline (0.42.1), not of the export:
    `latents=` is only accepted with 3 channels (check_inputs hard-codes the shape
    (B, 3, H, W)); a gray model generates from `generator=` only. And a Python float time step
    given to UNet2DModel directly is truncated to an integer (it builds a long tensor); tensors
    are used as they are.

Adopting a teacher (`load_diffusers_teacher`, `DiffusersEpsTeacher`)
    A DDPM-style directory (`unet/`: a UNet2DModel predicting ε; `scheduler/`: a DDPMScheduler
    config whose betas give ᾱ_t) becomes an EDM denoiser D(x; σ) with the call signature of
    karras.heun_step: σ_t = sqrt((1 - ᾱ_t)/ᾱ_t), model input x/sqrt(1 + σ²) (the VP sample),
    D = x - σ ε. A σ between two of the model's levels gets a fractional time step, linear in
    ln σ between the two neighbouring t; a σ outside [σ_0, σ_{T-1}] uses the end time step
    (0 or T-1) while x, the input scaling and D keep the true σ.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import nn

from cmpipe.cm.karras import Sigmas
from cmpipe.cm.precond import ConsistencyFunction
from cmpipe.cm.sampling import check_ts
from cmpipe.models.diffusers_dir import (  # noqa: F401 (the reading side, used here and re-exported)
    DiffusersFormatError,
    is_diffusers_dir,
    load_diffusers_teacher,
    load_unet as _load_unet,
    require_subdir as _require_subdir,
)
from cmpipe.models.networks import CheckpointError, load_network
from cmpipe.util.fileio import replace_dir, temp_dir_beside

EXPORT_FORMAT = "cmpipe-diffusers-export-1"
SIGMA_KEYS = tuple(f.name for f in fields(Sigmas))


# --- time steps ------------------------------------------------------------------------------

def ts_to_diffusers_timesteps(ts, num_scales: int) -> list[int]:
    """Our grid indices ts = [0, i_1, ...] (index 0 = sigma_max) -> the pipeline's `timesteps`.

    `ConsistencyModelPipeline(..., timesteps=ts_to_diffusers_timesteps([0, 11], 18))` visits
    the same sigmas as `consistency_sample(..., ts=[0, 11])`: timesteps = [11, 0].
    """
    ts = [int(t) for t in ts]
    check_ts(ts, num_scales, "ts")
    return sorted(ts, reverse=True)


def diffusers_timesteps_to_ts(timesteps, num_scales: int) -> list[int]:
    """The inverse of `ts_to_diffusers_timesteps`."""
    ts = sorted(int(t) for t in timesteps)
    check_ts(ts, num_scales, "timesteps (reversed)")
    return ts


def diffusers_default_ts(num_inference_steps: int, num_scales: int) -> list[int]:
    """The grid indices that `num_inference_steps=K` (no `timesteps`) makes the pipeline use."""
    if not 1 <= num_inference_steps <= num_scales:
        raise ValueError(f"num_inference_steps must be in 1..{num_scales}, got {num_inference_steps}")
    step = num_scales // num_inference_steps
    return [i * step for i in range(num_inference_steps)]


# --- sigmas ----------------------------------------------------------------------------------

def as_sigmas(values) -> Sigmas:
    """A Sigmas from a Sigmas, a mapping of its fields, or a namespace (params' `diffusion`)."""
    if isinstance(values, Sigmas):
        return values
    if isinstance(values, Mapping):
        d = dict(values)
    else:
        d = {k: getattr(values, k) for k in SIGMA_KEYS if hasattr(values, k)}
    unknown = sorted(set(d) - set(SIGMA_KEYS))
    if unknown:
        raise ValueError(f"unknown sigma settings {unknown}; known: {list(SIGMA_KEYS)}")
    return Sigmas(**d)


def resolve_sigmas(meta: Mapping, sigmas=None, *, source: str = "the model file") -> Sigmas:
    """The noise levels of a saved model: `sigmas` (or Sigmas' defaults) checked against `meta`.

    A model file records sigma_data and sigma_min (the scalings it was trained with); a grid
    whose values disagree with them would silently change the model, so that is an error.
    Keys of Sigmas that `meta` holds and `sigmas` does not give are taken from `meta`.
    """
    if sigmas is None:
        base = {}
    elif isinstance(sigmas, Mapping):  # only the keys given; the rest from meta or defaults
        base = dict(sigmas)
        as_sigmas({**asdict(Sigmas()), **base})  # validates names and values
    else:
        base = asdict(as_sigmas(sigmas))
    merged = asdict(Sigmas())
    merged.update({k: meta[k] for k in SIGMA_KEYS if k in meta})
    for k, v in base.items():
        if k in meta and not _same(meta[k], v):
            raise CheckpointError(f"{source} was made with {k} = {meta[k]}, but {k} = {v} was given "
                                  f"(diffusion.{k} in params.yaml?): use the model's value")
        merged[k] = v
    merged["num_scales"] = int(merged["num_scales"])
    return Sigmas(**{k: (merged[k] if k == "num_scales" else float(merged[k])) for k in SIGMA_KEYS})


def _same(a, b) -> bool:
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))


def scheduler_config(sig: Sigmas) -> dict:
    """CMStochasticIterativeScheduler keyword arguments for our noise levels."""
    return dict(num_train_timesteps=sig.num_scales, sigma_min=sig.sigma_min, sigma_max=sig.sigma_max,
                sigma_data=sig.sigma_data, s_noise=1.0, rho=sig.rho, clip_denoised=True)


# --- writing a directory atomically --------------------------------------------------------

def publish_dir(tmp: Path, out: Path, *, overwrite: bool, replaceable) -> Path:
    """Rename the finished `tmp` to `out`; an existing `out` is replaced only when `overwrite`
    and `replaceable(out)` say so (a guard against deleting a user's unrelated folder).

    `out` is never half-written: it is either the old directory or the complete new one
    (between the two renames it is briefly absent).
    """
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{out} already exists: choose another directory or allow "
                                  f"overwriting (--overwrite / overwrite=True)")
        if not out.is_dir() or out.is_symlink() or not replaceable(out):
            raise FileExistsError(f"{out} exists and does not look like an output of this command; "
                                  f"refusing to replace it")
    return replace_dir(tmp, out)


def _looks_exported(path: Path) -> bool:
    return (path / "model_index.json").is_file() or not any(path.iterdir())


# --- export ----------------------------------------------------------------------------------

def export_consistency_model(model_file, out_dir, *, which: str = "ema", sigmas=None,
                             sample_ts: Mapping | None = None, overwrite: bool = False) -> Path:
    """Write the `which` weights of a pipeline consistency model as a diffusers directory.

    sigmas: a Sigmas, a mapping or namespace of its fields (params' `diffusion`); None uses the
    model file's sigma_data/sigma_min and Sigmas' defaults for the rest (sigma_max 80, rho 7,
    N 18). sample_ts: optional {steps: ts} recorded in cmpipe.json (used by cmpipe.export.generate
    --steps). The directory is built beside `out_dir` and renamed into place when complete and
    checked; an existing `out_dir` is replaced only with `overwrite=True` and only when it
    holds a diffusers pipeline (model_index.json) or is empty.
    """
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    model_file, out = Path(model_file), Path(out_dir)
    net, ckpt = load_network(model_file, ("consistency",), which=which)
    meta = ckpt.get("meta", {})
    sig = resolve_sigmas(meta, sigmas, source=str(model_file))
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: choose another directory or pass overwrite=True")
    ts_map = {}
    for k, ts in (sample_ts or {}).items():
        check_ts([int(t) for t in ts], sig.num_scales, f"sample.ts.{k}")
        ts_map[str(int(k))] = [int(t) for t in ts]

    net.eval()
    scheduler = CMStochasticIterativeScheduler(**scheduler_config(sig))
    pipe = ConsistencyModelPipeline(unet=net, scheduler=scheduler)
    tmp = temp_dir_beside(out)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        info = {"format": EXPORT_FORMAT, "source": str(model_file), "which": which,
                "meta": meta, "sigmas": asdict(sig), "sample_ts": ts_map,
                "timesteps_note": "the pipeline's timesteps are grid indices in decreasing order: "
                                  "ts [0, i1, ...] -> timesteps [..., i1, 0]"}
        (tmp / "cmpipe.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
        _verify_export(tmp, net, sig)
        return publish_dir(tmp, out, overwrite=overwrite, replaceable=_looks_exported)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _verify_export(directory: Path, net: nn.Module, sig: Sigmas):
    """Reload what was written and check it equals what was meant (weights bit for bit)."""
    f, sig2, _ = load_consistency_dir(directory)
    if sig2 != sig:
        raise RuntimeError(f"export check failed: the written scheduler gives {sig2}, expected {sig}")
    want, got = net.state_dict(), f.net.state_dict()
    if set(want) != set(got) or any(not torch.equal(want[k].cpu(), got[k].cpu()) for k in want):
        raise RuntimeError("export check failed: the written UNet weights differ from the model file's")


# --- reading an exported directory ---------------------------------------------------------

def load_consistency_dir(directory, device=None) -> tuple[ConsistencyFunction, Sigmas, dict]:
    """Load an exported directory as this pipeline's consistency function f(x, sigma).

    Returns (f, sigmas, info) where info is cmpipe.json's content ({} when absent). Sampling it
    with sampling.cm_sampler gives the same images as the model file it came from.
    """
    from diffusers import CMStochasticIterativeScheduler

    directory = Path(directory)
    _require_subdir(directory, "scheduler", "scheduler_config.json",
                    "a CMStochasticIterativeScheduler config")
    cfg = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
    if cfg.get("_class_name") not in (None, "CMStochasticIterativeScheduler"):
        raise DiffusersFormatError(f"{directory / 'scheduler'} holds a {cfg.get('_class_name')}; "
                                   f"a consistency model needs CMStochasticIterativeScheduler")
    sched = CMStochasticIterativeScheduler.from_pretrained(directory, subfolder="scheduler",
                                                           local_files_only=True)
    c = sched.config
    if float(c.s_noise) != 1.0 or not c.clip_denoised:
        raise DiffusersFormatError(f"{directory / 'scheduler'}: s_noise = {c.s_noise}, clip_denoised = "
                                   f"{c.clip_denoised}; this pipeline's sampler uses s_noise = 1 and clips")
    sig = Sigmas(float(c.sigma_min), float(c.sigma_max), float(c.sigma_data), float(c.rho),
                 int(c.num_train_timesteps))
    unet = _load_unet(directory, device)
    f = ConsistencyFunction(unet, sig.sigma_data, sig.sigma_min).eval()
    info = {}
    if (directory / "cmpipe.json").is_file():
        info = json.loads((directory / "cmpipe.json").read_text())
    return f, sig, info


# --- command line ----------------------------------------------------------------------------

def main(argv=None) -> int:
    """python -m cmpipe.export.diffusers export MODEL OUT_DIR [--which ema] [--params params.yaml]"""
    import argparse

    from cmpipe.pipeline import params as params_mod

    ap = argparse.ArgumentParser(prog="python -m cmpipe.export.diffusers",
                                 description="Export a consistency model to a diffusers directory.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="model file -> ConsistencyModelPipeline directory")
    ex.add_argument("model", help="a consistency model saved by the pipeline (data/student/model.pt)")
    ex.add_argument("out", help="the directory to write")
    ex.add_argument("--which", default="ema", choices=("ema", "target", "model"))
    ex.add_argument("--params", default=None,
                    help="params.yaml whose `diffusion` (and `sample.ts`) to use "
                         "(default: none: the model file's recorded grid)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing exported directory")
    a = ap.parse_args(argv)
    try:
        sigmas, ts = None, None
        ppath = a.params
        if ppath:
            data = params_mod.read_params(ppath)
            if "diffusion" not in data:
                raise params_mod.ParamsError(f"{ppath} has no `diffusion` section")
            sigmas = params_mod.validate_section("diffusion", data["diffusion"])
            if "sample" in data:
                ts = params_mod.validate_section("sample", data["sample"]).ts
        out = export_consistency_model(a.model, a.out, which=a.which, sigmas=sigmas, sample_ts=ts,
                                       overwrite=a.overwrite)
    except (CheckpointError, params_mod.ParamsError, FileExistsError, ValueError) as e:
        raise SystemExit(f"export: {e}")
    print(f"wrote {out} (load it with diffusers.ConsistencyModelPipeline.from_pretrained)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
