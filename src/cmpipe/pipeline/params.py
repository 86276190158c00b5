"""The typed schema of params.yaml and its validation.

Each stage calls `load(section)` (or `load_many`) before any work: unknown keys,
missing keys, wrong types and out-of-range values fail with a `ParamsError`
that names the key (``teacher.lr``) and says what is allowed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from cmpipe.errors import ParamsError  # noqa: F401


@dataclass(frozen=True)
class Key:
    type: str  # int | float | bool | str | int_list | float_list | ts_map
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    nullable: bool = False
    help: str = ""
    min_len: int = 0  # lists: the fewest items (an empty block_out_channels is no network)


def _k(type_, **kw):
    return Key(type_, **kw)


POS = dict(min=1)
# The keys of one training loop (training.TrainConfig), the same for teacher, midtrain and distill.
TRAINING = {
    "seed": _k("int", min=0),
    "images": _k("int", **POS),
    "batch_size": _k("int", **POS),
    "lr": _k("float", min=1e-12, max=1.0),
    "optimizer": _k("str", choices=("adam", "radam")),
    "warmup_images": _k("int", min=0),
    # constant: lr after the warm-up | linear: from lr at the end of the warm-up down to 0 at the last step
    "lr_schedule": _k("str", choices=("constant", "linear")),
    "grad_clip": _k("float", min=0.0, nullable=True),
    "checkpoint_every": _k("int", **POS),
    "log_every": _k("int", **POS),
    # Evaluation EMAs: several decays are all kept, and the one whose held-out samples score the
    # lowest FID after the last step is used (cmpipe.training.selection): heldout_fid_count samples drawn
    # with heldout_fid_seed, also every heldout_fid_every images (a curve; null = at the end only).
    "ema_decays": _k("float_list", min=0.0, max=0.999999),
    "heldout_fid_every": _k("int", min=1, nullable=True),
    "heldout_fid_count": _k("int", min=2),
    "heldout_fid_seed": _k("int", min=0),
}
# Keys that were renamed: an old params.yaml gets the new name instead of "unknown key".
RENAMED = {"ema_decay": "ema_decays (a list, e.g. [0.99, 0.999]: every EMA is kept and the best is used)"}
SCHEMA: dict[str, dict[str, Key]] = {
    "shard": {
        "source": _k("str", choices=("fashion_mnist", "mnist", "cifar10", "image_folder", "npz")),
        "path": _k("str"),
        "download": _k("bool"),
        "resolution": _k("int", min=4, max=1024),
        "resize_mode": _k("str", choices=("resize", "pad")),
        "channels": _k("int", choices=(1, 3)),
        "alpha_background": _k("str", choices=("white", "black", "refuse")),
        "limit": _k("int", min=1, nullable=True),
        "images_per_shard": _k("int", **POS),
        "train_split": _k("str"),
        "ref_split": _k("str"),
        "holdout": _k("float", min=0.0),
    },
    "accel": {
        "bf16": _k("bool"),
        "tf32": _k("bool"),
        "channels_last": _k("bool"),
        "compile": _k("bool"),
    },
    "dist": {
        "nproc_per_node": _k("int", min=1, max=1024),
        "nnodes": _k("int", min=1, max=100000),
        "rdzv_endpoint": _k("str"),
        "rdzv_id": _k("str"),
    },
    "fid_ref": {
        "count": _k("int", min=2),
        "batch_size": _k("int", **POS),
    },
    "diffusion": {
        "sigma_min": _k("float", min=1e-6),
        "sigma_max": _k("float", min=1e-3),
        "sigma_data": _k("float", min=1e-6),
        "rho": _k("float", min=1e-3),
        "num_scales": _k("int", min=2, max=10000),
    },
    "model": {
        "block_out_channels": _k("int_list", min=1, min_len=1),
        "layers_per_block": _k("int", **POS),
        "attention_levels": _k("int_list", min=0),
        "dropout": _k("float", min=0.0, max=0.9),
        "class_conditional": _k("bool"),
    },
    "teacher": {
        "checkpoint": _k("str", nullable=True),
        **TRAINING,
        "heldout_fid_nfe": _k("int", min=1),
        "P_mean": _k("float"),
        "P_std": _k("float", min=1e-6),
        "grid_steps": _k("int", min=1, max=1000),
    },
    "trajectories": {
        "num_pairs": _k("int", **POS),
        "seed": _k("int", min=0),
        "batch_size": _k("int", **POS),
        "images_per_shard": _k("int", **POS),
        "device": _k("str", choices=("auto", "cpu", "cuda")),
        "bf16": _k("bool"),
        # Whole DPM-Solver++(2M) trajectories of the teacher for midtrain (CMT): how many, and the
        # NFE of each on the logSNR-uniform grid from sigma_max to sigma_min.
        "num_trajectories": _k("int", **POS),
        "nfe": _k("int", min=1, max=1000),
    },
    "midtrain": {
        "pairs": _k("str", choices=("cache", "online")),
        **TRAINING,
        # k points of each trajectory a step (stratified over the levels); null: all nfe (the reference)
        "points_per_trajectory": _k("int", min=1, nullable=True),
        "dropout": _k("float", min=0.0, max=0.9),
        "metric": _k("str", choices=("l2", "l1", "pseudo_huber", "lpips")),
        "huber_c": _k("float", min=1e-12, nullable=True),
        "lpips_net": _k("str", choices=("alex", "vgg")),
        "lpips_resize": _k("int", min=16, max=1024, nullable=True),
    },
    "distill": {
        "mode": _k("str", choices=("cd", "ct", "ect")),
        "pairs": _k("str", choices=("cache", "online")),
        "init": _k("str", choices=("teacher", "midtrain")),
        **TRAINING,
        # 0 images: no post-training, the student is distill.init's model (midtrain alone)
        "images": _k("int", min=0),
        "dropout": _k("float", min=0.0, max=0.9),
        "metric": _k("str", choices=("l2", "l1", "pseudo_huber", "lpips")),
        "huber_c": _k("float", min=1e-12, nullable=True),
        "lpips_net": _k("str", choices=("alex", "vgg")),
        "lpips_resize": _k("int", min=16, max=1024, nullable=True),
        "weighting": _k("str", choices=("uniform", "ict")),
        "mu_schedule": _k("str", choices=("fixed", "ct", "ct_paper")),
        "mu": _k("float", min=0.0, max=1.0),
        "ct_num_scales": _k("str", choices=("ct", "ict")),
        "ct_s0": _k("int", min=2),
        "ct_s1": _k("int", min=2),
        "ct_mu0": _k("float", min=0.0, max=1.0),
        "ict_s0": _k("int", min=2),
        "ict_s1": _k("int", min=2),
        "ct_index": _k("str", choices=("uniform", "lognormal")),
        "ict_P_mean": _k("float"),
        "ict_P_std": _k("float", min=1e-6),
        # Easy Consistency Tuning (mode ect; cm/schedules.py ect_r, cm/losses.py ect_loss)
        "ect_P_mean": _k("float"),
        "ect_P_std": _k("float", min=1e-6),
        "ect_q": _k("float", min=1.0, max=1e6),
        "ect_k": _k("float", min=0.0),
        "ect_b": _k("float", min=0.0),
        "ect_mapping": _k("str", choices=("sigmoid", "const")),
        "ect_stage_images": _k("int", **POS),
        "ect_huber_c": _k("float", min=0.0),
    },
    "sample": {
        "count": _k("int", **POS),
        "seed": _k("int", min=0),
        "batch_size": _k("int", **POS),
        "steps": _k("int_list", min=1, min_len=1),
        "ts": _k("ts_map"),
        "teacher_heun_nfe": _k("int_list", min=1),
        "teacher_euler_nfe": _k("int_list", min=1),
        "teacher_dpm_nfe": _k("int_list", min=1),
        "clip_denoised": _k("bool"),
        "search_ts": _k("bool"),
        "search_method": _k("str", choices=("ternary", "grid")),
        "search_count": _k("int", min=2),
        "search_seed": _k("int", min=0),
        "class_label": _k("int", min=0, nullable=True),
        "device": _k("str", choices=("auto", "cpu", "cuda")),
    },
    "edit": {
        "count": _k("int", min=1),
        "seed": _k("int", min=0),
        "ts": _k("int_list", min=0, min_len=1),
        "inpaint_mask": _k("str"),
        "inpaint_fraction": _k("float", min=0.05, max=0.95),
        "sr_factor": _k("int", min=2),
        "stroke_factor": _k("int", min=2),
        "stroke_levels": _k("int", min=2, max=256),
        "stroke_ts": _k("int_list", min=0, min_len=1),
        "stroke_image": _k("str", nullable=True),
        "interp_pairs": _k("int", min=1),
        "interp_frames": _k("int", min=2),
        "lpips_resize": _k("int", min=32, max=1024, nullable=True),
    },
    "evaluate": {
        "batch_size": _k("int", **POS),
        "kid_subsets": _k("int", **POS),
        "kid_subset_size": _k("int", **POS),
    },
}


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _check_number(name: str, v: Any, spec: Key):
    if spec.min is not None and v < spec.min:
        raise ParamsError(f"params.yaml: {name} = {v!r} is below its minimum {spec.min}")
    if spec.max is not None and v > spec.max:
        raise ParamsError(f"params.yaml: {name} = {v!r} is above its maximum {spec.max}")


def _validate_value(name: str, v: Any, spec: Key) -> Any:
    if v is None:
        if spec.nullable:
            return None
        raise ParamsError(f"params.yaml: {name} is null; it needs a {spec.type} value")
    t = spec.type
    if t == "int":
        if not _is_int(v):
            raise ParamsError(f"params.yaml: {name} = {v!r} must be an integer")
        _check_number(name, v, spec)
    elif t == "float":
        if not (_is_int(v) or isinstance(v, float)) or (isinstance(v, float) and not math.isfinite(v)):
            raise ParamsError(f"params.yaml: {name} = {v!r} must be a finite number")
        v = float(v)
        _check_number(name, v, spec)
    elif t == "bool":
        if not isinstance(v, bool):
            raise ParamsError(f"params.yaml: {name} = {v!r} must be true or false")
    elif t == "str":
        if not isinstance(v, str) or not v:
            raise ParamsError(f"params.yaml: {name} = {v!r} must be a non-empty string")
    elif t == "int_list":
        if not isinstance(v, list) or not all(_is_int(x) for x in v):
            raise ParamsError(f"params.yaml: {name} = {v!r} must be a list of integers")
        if len(v) < spec.min_len:
            raise ParamsError(f"params.yaml: {name} = {v!r} needs at least {spec.min_len} "
                              f"item{'s' if spec.min_len > 1 else ''}")
        for x in v:
            _check_number(name, x, spec)
        v = list(v)
    elif t == "float_list":
        if (not isinstance(v, list) or not v
                or not all((_is_int(x) or isinstance(x, float)) and math.isfinite(x) for x in v)):
            raise ParamsError(f"params.yaml: {name} = {v!r} must be a non-empty list of numbers")
        v = [float(x) for x in v]
        for x in v:
            _check_number(name, x, spec)
    elif t == "ts_map":
        if not isinstance(v, dict):
            raise ParamsError(f"params.yaml: {name} must map a step count to a list of grid indices, "
                              f"e.g. {{'2': [0, 11]}}")
        out = {}
        for k, ts in v.items():
            try:
                steps = int(k)
            except (TypeError, ValueError):
                raise ParamsError(f"params.yaml: {name} has key {k!r}; keys are step counts (integers)")
            if not isinstance(ts, list) or len(ts) != steps or not all(_is_int(i) and i >= 0 for i in ts):
                raise ParamsError(f"params.yaml: {name}.{k} = {ts!r} must be a list of {steps} "
                                  f"non-negative grid indices")
            # Their order and range against the grid: cm.sampling.check_ts, where they are used.
            out[steps] = list(ts)
        v = out
    else:  # pragma: no cover - schema error
        raise AssertionError(t)
    if spec.choices is not None and v not in spec.choices:
        raise ParamsError(f"params.yaml: {name} = {v!r} is not one of {list(spec.choices)}")
    return v


def validate_section(section: str, values: Any) -> SimpleNamespace:
    """Validate one section's dict against SCHEMA and return it as a namespace."""
    if section not in SCHEMA:
        raise ParamsError(f"params.yaml: unknown section {section!r}")
    schema = SCHEMA[section]
    if not isinstance(values, dict):
        raise ParamsError(f"params.yaml: section {section} must be a mapping of keys to values")
    unknown = sorted(set(values) - set(schema))
    renamed = [k for k in unknown if k in RENAMED]
    if renamed:
        raise ParamsError(f"params.yaml: {section}.{renamed[0]} was renamed to {section}.{RENAMED[renamed[0]]}")
    if unknown:
        raise ParamsError(f"params.yaml: unknown key {section}.{unknown[0]} "
                          f"(known keys of {section}: {', '.join(schema)})")
    missing = [k for k in schema if k not in values]
    if missing:
        raise ParamsError(f"params.yaml: missing key {section}.{missing[0]}; add it to params.yaml")
    out = {k: _validate_value(f"{section}.{k}", values[k], spec) for k, spec in schema.items()}
    return SimpleNamespace(**out)


def read_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found: run the stage from the repository root")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        # One line, not PyYAML's multi-line report: where it is, and what the parser expected.
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ParamsError(f"{path}: YAML syntax error{where} ({what}); fix that line "
                          f"(`git diff {path.name}` shows what changed)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ParamsError(f"{path}: cannot read it ({e})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must be a mapping of sections")
    unknown = sorted(set(data) - set(SCHEMA))
    if unknown:
        raise ParamsError(f"params.yaml: unknown section {unknown[0]!r} "
                          f"(known sections: {', '.join(SCHEMA)})")
    return data


def load(section: str, path: str | Path = "params.yaml") -> SimpleNamespace:
    """Read and validate one section of params.yaml."""
    data = read_params(path)
    if section not in data:
        raise ParamsError(f"params.yaml: missing section {section!r}")
    return validate_section(section, data[section])


def load_many(*sections: str, path: str | Path = "params.yaml") -> SimpleNamespace:
    """Several validated sections at once: `p.teacher.lr`, `p.diffusion.sigma_data`."""
    data = read_params(path)
    out = {}
    for s in sections:
        if s not in data:
            raise ParamsError(f"params.yaml: missing section {s!r}")
        out[s] = validate_section(s, data[s])
    return SimpleNamespace(**out)
