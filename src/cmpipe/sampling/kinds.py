"""Sample sets by name: the kinds (samplers), the naming scheme, and sets.json's checks.

A set is named after its sampler (its kind) and its number of function evaluations:
`<kind>_nfe<nfe>`, e.g. cm_nfe2 (2-step consistency sampling, Song et al. 2023 Algorithm 1),
teacher_heun_nfe35, teacher_euler_nfe2, teacher_dpm_nfe3 (the EDM teacher's samplers). The
params key of a teacher kind is `sample.<kind>_nfe`; the cm sets come from `sample.steps`.
No torch here: the report stage reads names without loading models.
"""
from __future__ import annotations

import json
from pathlib import Path

from cmpipe.errors import InputError

# Every kind of sample set (its sampler) with its name in the reports, in the order of plots and
# tables: the one list of kinds for all stages.
SAMPLER_NAMES = {"cm": "consistency model", "teacher_heun": "Heun", "teacher_euler": "Euler",
                 "teacher_dpm": "DPM-Solver++(2M)"}
KINDS = tuple(SAMPLER_NAMES)
TEACHER_KINDS = KINDS[1:]


def set_name(kind: str, nfe: int) -> str:
    """`<kind>_nfe<nfe>`: the name says the sampler and its cost."""
    if kind not in KINDS:
        raise ValueError(f"unknown sample-set kind {kind!r}: use one of {KINDS}")
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"a sample set's NFE must be a positive integer, got {nfe!r}")
    return f"{kind}_nfe{nfe}"


def set_file(samples_dir: Path, name: str) -> Path:
    """The .npz file of set `name` in the sample-set folder."""
    return Path(samples_dir) / f"{name}.npz"


def read_sets(path: Path) -> dict[str, dict]:
    """sets.json, checked: {set_name: {"kind", "nfe", "count", ...}}."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found: run the sample stage first (`dvc repro sample`)")
    try:
        sets = json.loads(path.read_text())
    except ValueError as e:
        raise InputError(f"{path} is not valid JSON ({e}); rerun `dvc repro -f sample`")
    if not isinstance(sets, dict) or not sets:
        raise InputError(f"{path} must map set names to their description and list at least one set")
    for name, info in sets.items():
        if not isinstance(info, dict):
            raise InputError(f"{path}: set {name!r} must be an object with kind and nfe")
        if info.get("kind") not in KINDS:
            raise InputError(f"{path}: set {name!r} has kind {info.get('kind')!r}, expected one of {KINDS}")
        nfe = info.get("nfe")
        if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
            raise InputError(f"{path}: set {name!r} has nfe {nfe!r}, expected a positive integer")
        # The name is a file stem in the sample-set folder: no folders, no hidden files.
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise InputError(f"{path}: set name {name!r} must be a plain file name stem")
    return sets


def kind_order(sets: dict[str, dict]) -> list[str]:
    """The set names ordered by kind (`KINDS`), then NFE, then name: the order of plots."""
    return sorted(sets, key=lambda s: (KINDS.index(sets[s]["kind"]), sets[s]["nfe"], s))

