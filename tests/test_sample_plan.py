"""The sample-set plan (issue 20): one naming scheme `<sampler>_nfe<NFE>`, one list of kinds, the
plan's checks before any work, the sampler of each kind, and sets.json's checks."""
import json
from types import SimpleNamespace

import pytest
import torch

from cmpipe.cm.karras import Sigmas
from cmpipe.distributed.ddp import SINGLE
from cmpipe.errors import InputError, ParamsError
from cmpipe.sampling.kinds import KINDS, SAMPLER_NAMES, kind_order, read_sets, set_file, set_name
from cmpipe.sampling.plan import SetSamplers, params_ts, plan_sets, sample_sets
from cmpipe.sampling.sets import generate

SIG = Sigmas(num_scales=18)


def sample_params(**kw):
    base = dict(steps=[1, 2], ts={2: [0, 11]}, teacher_heun_nfe=[7], teacher_euler_nfe=[1], teacher_dpm_nfe=[2])
    return SimpleNamespace(**{**base, **kw})


def test_set_names_say_their_sampler_and_nfe():
    assert [set_name(k, 3) for k in KINDS] == ["cm_nfe3", "teacher_heun_nfe3", "teacher_euler_nfe3",
                                               "teacher_dpm_nfe3"]
    assert set(SAMPLER_NAMES) == set(KINDS)
    with pytest.raises(ValueError, match=r"unknown sample-set kind 'teacher'.*teacher_heun"):
        set_name("teacher", 7)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            set_name("cm", bad)
    assert set_file(__import__("pathlib").Path("data/samples"), "cm_nfe1").as_posix() == "data/samples/cm_nfe1.npz"


def test_plan_names_every_set_and_keeps_the_params_keys():
    sets = plan_sets(sample_params(), SIG)
    assert list(sets) == ["cm_nfe1", "cm_nfe2", "teacher_heun_nfe7", "teacher_euler_nfe1", "teacher_dpm_nfe2"]
    assert sets["cm_nfe1"] == {"kind": "cm", "nfe": 1, "ts": [0]}
    assert sets["cm_nfe2"]["ts"] == [0, 11]  # from params
    assert sets["teacher_heun_nfe7"] == {"kind": "teacher_heun", "nfe": 7, "steps": 4}
    # without params ts: evenly spaced, the one default of every use
    assert params_ts(sample_params(ts={}), 3, SIG.num_scales) == [0, 6, 11]
    assert plan_sets(sample_params(ts={}, steps=[3]), SIG)["cm_nfe3"]["ts"] == [0, 6, 11]


@pytest.mark.parametrize("change, message", [
    ({"ts": {2: [0, 20]}}, r"sample\.ts\.2 = \[0, 20\] must start at 0 and increase strictly"),
    ({"ts": {2: [3, 5]}}, r"sample\.ts\.2"),
    ({"teacher_heun_nfe": [8]}, r"odd NFE.*sample\.teacher_heun_nfe"),
    ({"teacher_euler_nfe": [0]}, r"sample\.teacher_euler_nfe: NFE must be at least 1, got 0"),
    ({"teacher_dpm_nfe": [-2]}, r"sample\.teacher_dpm_nfe: NFE must be at least 1, got -2"),
])
def test_plan_refuses_bad_sets_naming_the_key(change, message):
    with pytest.raises(ParamsError, match=message):
        plan_sets(sample_params(**change), SIG)


def test_each_kind_gets_its_sampler_and_an_unknown_kind_is_refused():
    def D(x, sigma):
        return 0.5 * x

    samplers = SetSamplers(f=lambda x, sigma: 0 * x, teacher=D, sig=SIG, shape=(1, 2, 2), seed=0)
    noise = torch.randn(2, 1, 2, 2)
    for name, info in plan_sets(sample_params(), SIG).items():
        out = samplers.for_set(info)(noise, [0, 1])
        assert out.shape == noise.shape and out.abs().max() <= 1, name
    with pytest.raises(ValueError, match=r"kind 'gan'.*plan_sets"):
        samplers.for_set({"kind": "gan", "nfe": 1})


def test_sample_sets_writes_each_set_and_its_grid(tmp_path):
    samplers = SetSamplers(f=lambda x, sigma: torch.zeros_like(x), teacher=None, sig=SIG, shape=(1, 4, 4), seed=0)
    sets = {"cm_nfe1": {"kind": "cm", "nfe": 1, "ts": [0]}}
    timing = sample_sets(sets, samplers, 3, 2, torch.device("cpu"), SINGLE, tmp_path / "s", tmp_path / "g")
    assert set(timing) == {"cm_nfe1"} and sets["cm_nfe1"]["count"] == 3 and sets["cm_nfe1"]["device"] == "cpu"
    import numpy as np

    with np.load(tmp_path / "s/cm_nfe1.npz") as z:
        assert z["images"].shape == (3, 4, 4, 1) and (z["images"] == 128).all()  # 0 in [-1, 1]
    assert (tmp_path / "g/cm_nfe1.png").read_bytes()[:4] == b"\x89PNG"


def test_generate_under_torchrun_needs_the_output_folder():
    dist = SimpleNamespace(enabled=True, my_batches=lambda n: range(n), is_main=True)
    with pytest.raises(ValueError, match="needs parts_dir"):
        generate(lambda noise, idx: noise, 2, 2, (1, 2, 2), 0, torch.device("cpu"), "t", dist=dist)


def test_read_sets_checks_every_entry(tmp_path):
    path = tmp_path / "sets.json"
    with pytest.raises(InputError, match=r"sets\.json not found: run the sample stage first"):
        read_sets(path)
    for content, message in [("{", "not valid JSON"), ("{}", "at least one set"),
                             ({"a": 3}, "must be an object"), ({"a": {"kind": "cm", "nfe": 0}}, "nfe 0"),
                             ({"../a": {"kind": "cm", "nfe": 1}}, "plain file name stem"),
                             ({"teacher_nfe7": {"kind": "teacher", "nfe": 7}}, "kind 'teacher'")]:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(InputError, match=message):
            read_sets(path)
    good = {"teacher_heun_nfe7": {"kind": "teacher_heun", "nfe": 7}, "cm_nfe2": {"kind": "cm", "nfe": 2},
            "cm_nfe1": {"kind": "cm", "nfe": 1}}
    path.write_text(json.dumps(good))
    assert read_sets(path) == good
    assert kind_order(good) == ["cm_nfe1", "cm_nfe2", "teacher_heun_nfe7"]


def test_library_layers_never_import_the_pipeline():
    """sampling/ and editing/ are library code: params and paths come from the stages."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src/cmpipe"
    for f in [*(src / "sampling").glob("*.py"), *(src / "editing").glob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert not n.startswith(("cmpipe.pipeline", "cmpipe.export", "stages")), f"{f.name} imports {n}"
