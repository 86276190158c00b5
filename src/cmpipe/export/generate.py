"""Generate images with a trained consistency model.

    python -m cmpipe.export.generate --model data/student/model.pt --steps 2 --count 64 --seed 3 --out gen/
    python -m cmpipe.export.generate --model exported/ --ts 0,11 --count 16 --out gen/

`--model` is a consistency model file saved by the pipeline (data/student/model.pt) or a
directory exported with `python -m cmpipe.export.diffusers export`. The images come from the
pipeline's own sampler (sample_sets.cm_sampler, noise drawn per sample from (seed, index)), so
`--steps K --seed S` gives, image for image, the `sample` stage's cm_nfe<K> set for
`sample.seed` S (at the same --batch-size as `sample.batch_size` the bytes match; another
batch size can change a pixel by one level, as the README notes for the stage).

Noise levels: an exported directory carries them (its scheduler config). A model file records
only sigma_data and sigma_min, so the grid (sigma_max, rho, num_scales) comes from the
`diffusion` section of `--params` when given (a model file made by this pipeline records its whole
grid; else the defaults 80, 7, 18). `--steps K` uses `sample.ts.K` of that file (or the export's
recorded ts) when there is one, otherwise evenly spaced indices (cm.sampling.default_ts).

Writes DIR/000000.png, DIR/000001.png, ..., DIR/grid.png (the first 64 images) and
DIR/generate.json (the settings), into a temporary directory beside DIR renamed when complete.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cmpipe.cm.karras import Sigmas
from cmpipe.cm.precond import ConsistencyFunction
from cmpipe.cm.sampling import check_ts, default_ts
from cmpipe.distributed.device import pick_device
from cmpipe.export.diffusers import (
    DiffusersFormatError,
    is_diffusers_dir,
    load_consistency_dir,
    publish_dir,
    resolve_sigmas,
)
from cmpipe.util.images import save_grid, to_uint8
from cmpipe.models.networks import CheckpointError, load_network
from cmpipe.pipeline import params as params_mod
from cmpipe.sampling.sets import class_labels, cm_sampler
from cmpipe.util.fileio import temp_dir_beside
from cmpipe.util.seeding import per_sample_randn

log = logging.getLogger("cmpipe.export.generate")
GRID_IMAGES = 64


class GenerateError(ValueError):
    """A user error of the generate command: bad arguments, an unusable model."""


def is_class_conditional(unet_config) -> bool:
    get = unet_config.get if isinstance(unet_config, dict) else (lambda k, d=None: getattr(unet_config, k, d))
    return get("num_class_embeds") is not None or get("class_embed_type") is not None


def load_model(path, *, which: str = "ema", params_path=None):
    """-> (f, sigmas, shape (C, H, W), unet config, {steps: ts} from the params or the export)."""
    path = Path(path)
    if not path.exists():
        raise GenerateError(f"model {path} not found: give a consistency model file saved by the "
                            f"pipeline (data/student/model.pt) or a directory exported with "
                            f"`python -m cmpipe.export.diffusers export`")
    if path.is_dir():
        if not is_diffusers_dir(path):
            raise GenerateError(f"{path} is a directory but not an exported diffusers model "
                                f"(no model_index.json or unet/)")
        f, sig, info = load_consistency_dir(path)
        if params_path is not None:
            log.info("--params is not used for a diffusers directory: its scheduler config has the grid")
        ucfg = dict(f.net.config)
        ts_map = {int(k): v for k, v in info.get("sample_ts", {}).items()}
        source = f"diffusers directory {path}"
    else:
        net, ckpt = load_network(path, ("consistency",), which=which)
        ucfg = ckpt["unet"]
        diffusion, ts_map = _read_params(params_path)
        sig = resolve_sigmas(ckpt.get("meta", {}), diffusion, source=str(path))
        f = ConsistencyFunction(net, sig.sigma_data, sig.sigma_min)
        source = f"model file {path} ({which} weights)"
    f.eval().requires_grad_(False)
    shape = (int(ucfg["in_channels"]), int(ucfg["sample_size"]), int(ucfg["sample_size"]))
    log.info("%s: %s, %d-point grid", source, shape, sig.num_scales)
    return f, sig, shape, ucfg, ts_map


def _read_params(params_path):
    if params_path is None:  # the model's own record of its grid; a params file only when asked for
        log.info("no --params: the grid is the one the model file records (else sigma_max 80, rho 7, "
                 "num_scales 18) and --steps uses evenly spaced indices")
        return None, {}
    data = params_mod.read_params(params_path)
    if "diffusion" not in data:
        raise GenerateError(f"{params_path} has no `diffusion` section (the model's noise levels)")
    diffusion = params_mod.validate_section("diffusion", data["diffusion"])
    ts_map = params_mod.validate_section("sample", data["sample"]).ts if "sample" in data else {}
    return diffusion, {int(k): list(v) for k, v in ts_map.items()}


def parse_ts(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise GenerateError(f"--ts {text!r}: give grid indices separated by commas, e.g. 0,11") from None


def choose_ts(sig: Sigmas, steps: int | None, ts: list[int] | None, ts_map: dict) -> list[int]:
    if ts is None:
        steps = 1 if steps is None else steps
        if not 1 <= steps <= sig.num_scales - 1:
            raise GenerateError(f"--steps {steps}: must be in 1..{sig.num_scales - 1} "
                                f"(the {sig.num_scales}-point grid)")
        ts = list(ts_map.get(steps, default_ts(steps, sig.num_scales)))
        what = f"ts for --steps {steps}"
    else:
        what = "--ts"
    try:
        check_ts(ts, sig.num_scales, what)
    except ValueError as e:
        raise GenerateError(str(e).replace(", diffusion.num_scales)", " of this model)")) from None
    return ts


def _png_bytes(img_hwc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img_hwc[..., 0] if img_hwc.shape[-1] == 1 else img_hwc).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _looks_generated(path: Path) -> bool:
    names = [p.name for p in path.iterdir()]
    return all(n.endswith(".png") or n == "generate.json" for n in names)


@torch.no_grad()
def sample_images(f, sig: Sigmas, ts: list[int], shape, *, count: int, seed: int, batch_size: int,
                  device, desc: str = "generate", labels=None):
    """Yield (indices, uint8 N×H×W×C) batches; exactly sampling.generate's noise and sampler
    (and, for a class-conditional model, the classes `labels` gives each index)."""
    sampler = cm_sampler(f, sig, ts, seed, shape, labels)
    with tqdm(total=count, desc=desc, unit="img", mininterval=2.0, file=sys.stderr) as bar:
        for start in range(0, count, batch_size):
            idx = list(range(start, min(count, start + batch_size)))
            noise = per_sample_randn(seed, idx, shape).to(device)
            yield idx, to_uint8(sampler(noise, idx))
            bar.update(len(idx))


def run(model, out, *, steps: int | None = None, ts: list[int] | None = None, count: int = 16,
        seed: int = 0, batch_size: int = 64, class_label: int | None = None, which: str = "ema",
        params_path=None, device: str = "auto", overwrite: bool = False) -> Path:
    if count < 1:
        raise GenerateError(f"--count {count}: must be at least 1")
    if batch_size < 1:
        raise GenerateError(f"--batch-size {batch_size}: must be at least 1")
    if seed < 0:
        raise GenerateError(f"--seed {seed}: must be >= 0")
    if steps is not None and ts is not None:
        raise GenerateError("give --steps or --ts, not both")
    out = Path(out)
    if out.exists() and not overwrite:
        raise GenerateError(f"{out} already exists: choose another --out or pass --overwrite")
    f, sig, shape, ucfg, ts_map = load_model(model, which=which, params_path=params_path)
    conditional = is_class_conditional(ucfg)
    if class_label is not None and not conditional:
        raise GenerateError(f"--class {class_label}: this model is not class-conditional "
                            f"(its UNet has no class embedding)")
    num_classes = ucfg.get("num_class_embeds") if conditional else None
    if conditional and num_classes is None:
        raise GenerateError(f"{model}: its UNet is conditioned through class_embed_type "
                            f"{ucfg.get('class_embed_type')!r}, which this command does not drive; "
                            f"only num_class_embeds (a class index) is supported")
    try:
        labels = class_labels(num_classes, seed, class_label)
    except ValueError as e:
        raise GenerateError(f"--class: {e}") from None
    ts = choose_ts(sig, steps, ts, ts_map)
    dev = pick_device(device)
    f = f.to(dev)
    log.info("sampling %d images, ts %s (%d steps), seed %d", count, ts, len(ts), seed)

    tmp = temp_dir_beside(out)
    try:
        first = []
        for idx, images in sample_images(f, sig, ts, shape, count=count, seed=seed,
                                         batch_size=batch_size, device=dev, labels=labels):
            for i, img in zip(idx, images):
                (tmp / f"{i:06d}.png").write_bytes(_png_bytes(img))
            if sum(len(a) for a in first) < GRID_IMAGES:
                first.append(images)
        save_grid(np.concatenate(first)[:GRID_IMAGES], tmp / "grid.png", nrow=8)
        settings = {"model": str(model), "which": which if not Path(model).is_dir() else None,
                    "ts": ts, "steps": len(ts), "count": count, "seed": seed, "batch_size": batch_size,
                    "sigmas": {k: getattr(sig, k) for k in ("sigma_min", "sigma_max", "sigma_data", "rho",
                                                              "num_scales")},
                    "device": dev.type}
        if labels is not None:
            settings.update(num_classes=num_classes, class_label=class_label,
                            labels=labels(range(count)).tolist())
        (tmp / "generate.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        try:
            publish_dir(tmp, out, overwrite=overwrite, replaceable=_looks_generated)
        except FileExistsError as e:
            raise GenerateError(str(e)) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cmpipe.export.generate",
                                 description="Generate PNG images with a consistency model.")
    ap.add_argument("--model", required=True,
                    help="data/student/model.pt (a model file of the pipeline) or an exported diffusers directory")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="number of sampling steps (default 1)")
    g.add_argument("--ts", help="grid indices, e.g. 0,11 (index 0 = sigma_max)")
    ap.add_argument("--count", type=int, default=16, help="number of images (default 16)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed (the sample stage uses sample.seed)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", required=True, help="output directory (must not exist, unless --overwrite)")
    ap.add_argument("--class", dest="class_label", type=int, default=None,
                    help="class label (class-conditional models only)")
    ap.add_argument("--which", default="ema", choices=("ema", "target", "model"),
                    help="weights of a model file (default: the evaluation EMA)")
    ap.add_argument("--params", default=None,
                    help="a params.yaml whose diffusion grid and sample.ts to use with a model file (default: none)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out if it holds only a previous run's PNGs")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        ts = parse_ts(a.ts) if a.ts is not None else None
        out = run(a.model, a.out, steps=a.steps, ts=ts, count=a.count, seed=a.seed, batch_size=a.batch_size,
                  class_label=a.class_label, which=a.which, params_path=a.params, device=a.device,
                  overwrite=a.overwrite)
    except (GenerateError, CheckpointError, DiffusersFormatError, params_mod.ParamsError) as e:
        raise SystemExit(f"generate: {e}")
    except RuntimeError as e:
        if "cuda" in str(e).lower():
            raise SystemExit(f"generate: {e}")
        raise
    print(f"wrote {a.count} images and grid.png to {out}")
    return 0


if __name__ == "__main__":
    from cmpipe.distributed.device import fast_cpu_defaults

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    fast_cpu_defaults()  # as the sample stage does (run_stage), so the images match it
    raise SystemExit(main())
