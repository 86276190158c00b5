"""params.yaml validation: each failure names the key and what is allowed."""
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from cmpipe.pipeline import params


def write(tmp_path, mutate):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(data)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_repository_params_are_valid():
    for f in ("params.yaml", "params-smoke.yaml", "params-gpu-cifar10.yaml"):
        data = params.read_params(ROOT / f)
        for section in params.SCHEMA:
            params.validate_section(section, data[section])


def test_unknown_key_is_named(tmp_path):
    p = write(tmp_path, lambda d: d["teacher"].update(learning_rate=0.1))
    with pytest.raises(params.ParamsError, match=r"unknown key teacher\.learning_rate"):
        params.load("teacher", p)


def test_wrong_type_is_named(tmp_path):
    p = write(tmp_path, lambda d: d["teacher"].update(batch_size="64"))
    with pytest.raises(params.ParamsError, match=r"teacher\.batch_size = '64' must be an integer"):
        params.load("teacher", p)
    p = write(tmp_path, lambda d: d["distill"].update(mu=True))
    with pytest.raises(params.ParamsError, match=r"distill\.mu"):
        params.load("distill", p)


def test_out_of_range_and_choices(tmp_path):
    p = write(tmp_path, lambda d: d["distill"].update(mu=1.5))
    with pytest.raises(params.ParamsError, match=r"distill\.mu = 1\.5 is above its maximum 1\.0"):
        params.load("distill", p)
    p = write(tmp_path, lambda d: d["distill"].update(metric="l3"))
    with pytest.raises(params.ParamsError, match=r"distill\.metric = 'l3' is not one of"):
        params.load("distill", p)
    p = write(tmp_path, lambda d: d["sample"]["ts"].update({"2": [0, 30, 31]}))
    with pytest.raises(params.ParamsError, match=r"sample\.ts\.2"):
        params.load("sample", p)


def test_missing_key_and_unknown_section(tmp_path):
    p = write(tmp_path, lambda d: d["teacher"].pop("lr"))
    with pytest.raises(params.ParamsError, match=r"missing key teacher\.lr"):
        params.load("teacher", p)
    p = write(tmp_path, lambda d: d.update(teachers={}))
    with pytest.raises(params.ParamsError, match=r"unknown section 'teachers'"):
        params.load("teacher", p)


def test_stage_fails_before_work_with_the_key_named(tmp_path):
    # The real stage module, run as DVC runs it, on a params.yaml with a typo.
    write(tmp_path, lambda d: d["teacher"].update(lr="fast"))
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    r = subprocess.run([sys.executable, "-m", "stages.teacher"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0
    assert "teacher.lr = 'fast' must be a finite number" in r.stderr
    assert not (tmp_path / "data").exists()  # nothing written
