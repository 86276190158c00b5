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
    for f in ("params.yaml", "params-smoke.yaml", "params-gpu-cifar10.yaml", "params-gpu-quick.yaml"):
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


def cmt_recipe_overrides() -> dict:
    """The `-S key=value` overrides of the README's CMT CIFAR-10 block (the fenced block with
    `dvc exp run -n cmt-cifar10`), each value parsed as YAML, as `dvc exp run -S` parses it."""
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "dvc exp run -n cmt-cifar10" in b]
    assert len(blocks) == 1, "README.md needs exactly one ```bash block with `dvc exp run -n cmt-cifar10`"
    command = blocks[0][blocks[0].index("dvc exp run -n cmt-cifar10"):].replace("\\\n", " ")
    tokens = shlex.split(command)
    sets = [tokens[i + 1] for i, t in enumerate(tokens) if t == "-S"]
    assert sets and len(sets) == tokens.count("-S")
    overrides = {}
    for s in sets:
        key, sep, value = s.partition("=")
        assert sep and key.count(".") == 1, f"-S {s}: one key=value per -S, key as section.name"
        assert key not in overrides, f"{key} is set twice"
        overrides[key] = yaml.safe_load(value)
    return overrides


def test_readme_cmt_recipe_validates_on_the_gpu_profile():
    from cmpipe.pipeline.setups.distill import check_distill
    from cmpipe.pipeline.setups.midtrain import trajectories_per_step

    data = params.read_params(ROOT / "params-gpu-cifar10.yaml")
    overrides = cmt_recipe_overrides()
    for key, value in overrides.items():
        section, name = key.split(".")
        assert name in data[section], f"{key} is not in params-gpu-cifar10.yaml (dvc exp run -S refuses it)"
        data[section][name] = value
    p = {section: params.validate_section(section, data[section]) for section in params.SCHEMA}
    d, m, t = p["distill"], p["midtrain"], p["trajectories"]
    check_distill(d)
    # Mid-training as sony/cmt's CIFAR-10 run: 128 points a step = 8 trajectories x 16 points.
    assert t.nfe == 16 and m.batch_size == 128 and trajectories_per_step(m, t.nfe) == 8
    assert (m.pairs, m.metric, m.lpips_net, m.lpips_resize) == ("online", "lpips", "vgg", None)
    assert (m.optimizer, m.lr, m.dropout, m.ema_decays, m.images) == ("radam", 2e-4, 0.2, [0.999], 38_400_000)
    # Post-training: ECT from the mid-trained weights, q = 4096 and one stage (no halving).
    assert (d.init, d.mode, d.ect_q, d.ect_huber_c) == ("midtrain", "ect", 4096.0, 0.0)
    assert d.ect_stage_images >= d.images == 12_800_000
    steps = -(-d.images // d.batch_size)
    assert (steps - 1) // max(1, d.ect_stage_images // d.batch_size) == 0  # the last step is in stage 0
    assert (d.optimizer, d.lr, d.batch_size, d.warmup_images, d.dropout, d.ema_decays) == \
        ("radam", 1e-4, 128, 0, 0.2, [0.9999])
    # The budgets split evenly over the profile's processes (dist.part refuses an uneven split).
    world = p["dist"].nproc_per_node * p["dist"].nnodes
    assert trajectories_per_step(m, t.nfe) % world == 0 and d.batch_size % world == 0
