"""The whole DAG through the real `dvc` command, on the smoke params, in temporary git repos.

One smoke repository is built per test session (shared by pytest-xdist's workers through a file
lock); every test works in its own copy of it, so the tests are independent and run in parallel.
"""
import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GIT, ROOT, project_repo, repo_env, run

pytestmark = pytest.mark.slow
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([a-z_]+)'", output))


def require_fashion():
    if not FASHION.exists():
        pytest.skip(f"{FASHION} missing: `make setup` installs dataset-fashion-mnist")


def smoke_project(repo: Path) -> dict:
    require_fashion()
    return project_repo(repo, (ROOT / "params-smoke.yaml").read_text())


@pytest.fixture(scope="session")
def smoke_base(tmp_path_factory):
    """The smoke project after one `dvc repro`, results committed: (repo, repro output). Built
    once: the first xdist worker to need it builds it while the others wait on the lock."""
    from filelock import FileLock

    require_fashion()  # before anything is made: a skip must not leave a half-built project
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    repo, log, failed = root / "smoke-base", root / "smoke-base.log", root / "smoke-base.failed"
    with FileLock(str(root / "smoke-base.lock")):
        if failed.exists():
            raise AssertionError(failed.read_text())
        if not log.exists():
            repo.mkdir()
            try:
                env = smoke_project(repo)
                r = run(["dvc", "repro"], repo, env)
                run(GIT + ["add", "-A"], repo, env)
                run(GIT + ["commit", "-qm", "smoke results"], repo, env)
            except Exception as e:  # the other workers report it instead of building on the remains
                failed.write_text(f"the shared smoke project failed to build: {type(e).__name__}: {e}")
                raise
            log.write_text(r.stdout + r.stderr)
    return repo, log.read_text()


@pytest.fixture
def smoke_repo(smoke_base, tmp_path):
    """A private copy of the built smoke project: (repo, env, repro output)."""
    base, out = smoke_base
    repo = tmp_path / "smoke"
    # .dvc/tmp holds locks and experiment queues of the base, not project state
    shutil.copytree(base, repo, symlinks=True,
                    ignore=lambda d, names: ["tmp"] if Path(d) == base / ".dvc" else [])
    return repo, repo_env(repo), out


def read_metrics(repo: Path) -> dict:
    return json.loads((repo / "reports/metrics.json").read_text())


def _set_params(repo: Path, **changes):
    import yaml

    p = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        p[section][name] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def _weights(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["weights"]


# Outputs that hold wall-clock measurements (throughput curves, seconds per image); every other
# output of two fresh runs must hash the same.
TIMED_OUTPUTS = {"reports/teacher", "reports/midtrain", "reports/distill", "reports/trajectories.json",
                 "reports/sample_timing.json", "reports/summary.md"}


def _output_hashes(lock_text: str) -> dict:
    import yaml

    lock = yaml.safe_load(lock_text)
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])}


# The tests run in this order, before the short ones (conftest.py). `make test` runs
# `pytest -n 2 --maxschedchunk=1`: each worker starts with two tests, one worker with the
# first two (a fresh run of its own, then the class-conditional experiment), the other with the
# next two (it builds the shared smoke project meanwhile, for the queued experiments), and
# each later test goes to whichever worker is free first.
def test_two_fresh_runs_give_identical_outputs(tmp_path, request):
    repo = tmp_path / "again"
    repo.mkdir()
    env = smoke_project(repo)
    run(["dvc", "repro"], repo, env)
    second = _output_hashes((repo / "dvc.lock").read_text())
    base, _ = request.getfixturevalue("smoke_base")   # the first fresh run, made meanwhile
    first = _output_hashes((base / "dvc.lock").read_text())
    assert set(first) == set(second) and TIMED_OUTPUTS < set(first)
    differ = {p for p in first if first[p] != second[p]}
    assert differ <= TIMED_OUTPUTS, differ
    assert (json.loads((repo / "reports/metrics.json").read_text())
            == json.loads((base / "reports/metrics.json").read_text()))


def test_class_conditional_model_reruns_from_the_teacher_with_one_row_per_class(smoke_repo):
    repo, env, _ = smoke_repo
    r = run(["dvc", "exp", "run", "-S", "model.class_conditional=true", "-n", "conditional"], repo, env)
    out = r.stdout + r.stderr
    assert ran_stages(out) == {"teacher", "trajectories", "midtrain", "distill", "sample", "copy_check", "evaluate",
                               "edit", "report"}, out[-3000:]
    assert "conditioned on 10 classes" in out
    sets = json.loads((repo / "data/samples/sets.json").read_text())
    assert sets["cm_nfe1"]["classes"] == 10
    import numpy as np
    from PIL import Image

    with np.load(repo / "data/samples/cm_nfe1.npz") as z:
        assert z["labels"].shape == (len(z["images"]),) and set(z["labels"].tolist()) <= set(range(10))
    side = 28 + 2   # image + padding, doubled by save_grid's scale
    assert Image.open(repo / "reports/samples/cm_nfe1.png").size == (2 * (8 * side + 2), 2 * (10 * side + 2))
    assert "one row per class" in (repo / "reports/summary.md").read_text()
    assert all(math.isfinite(v) for v in read_metrics(repo)["fid"].values())


def test_two_queued_experiments_run_in_parallel_and_show_up(smoke_repo):
    """Two queued experiments with two workers, both post-training the mid-trained model (the smoke
    params' distill.init): Easy Consistency Tuning (mode ect: the images, no pair cache) at another lr
    after mid-training on online trajectories, and improved consistency training with LPIPS (mode
    ct: no pair cache, iCT's schedule, weighting and noise distribution) after the cached one."""
    import time

    repo, env, _ = smoke_repo
    ict = ["distill.mode=ct", "distill.ct_num_scales=ict", "distill.mu_schedule=fixed", "distill.mu=0",
           "distill.weighting=ict", "distill.ct_index=lognormal", "distill.metric=lpips"]
    ect = ["distill.mode=ect", "distill.lr=0.0004", "midtrain.pairs=online"]
    for name, keys in (("queued-ect", ect), ("ict-lpips", ict)):
        run(["dvc", "exp", "run", "--queue", "-n", name] + [a for k in keys for a in ("-S", k)], repo, env)
    run(["dvc", "queue", "start", "-j", "2"], repo, env)
    deadline, status = time.time() + 900, ""
    while time.time() < deadline:
        status = run(["dvc", "queue", "status"], repo, env).stdout
        done = [line for line in status.splitlines() if line.split()[-1:] in (["Success"], ["Failed"])]
        if len(done) >= 2:
            break
        time.sleep(2)
    assert status.count("Success") == 2, status
    show = run(["dvc", "exp", "show", "--no-pager", "--csv"], repo, env).stdout
    rows = {r["Experiment"]: r for r in csv.DictReader(io.StringIO(show))}  # list params are quoted cells
    assert rows["queued-ect"]["distill.lr"] == "0.0004" and rows["queued-ect"]["distill.mode"] == "ect"
    assert rows["ict-lpips"]["distill.mode"] == "ct" and rows["ict-lpips"]["distill.metric"] == "lpips"
    after = {"trajectories", "distill", "sample", "copy_check", "evaluate", "edit", "report"}
    for name, ran in (("queued-ect", after | {"midtrain"}), ("ict-lpips", after)):
        assert math.isfinite(float(rows[name]["fid.cm_nfe1"]))
        out = run(["dvc", "queue", "logs", name], repo, env).stdout
        # no pairs to make: trajectories writes the empty pair cache that says why, and the same whole
        # trajectories, so midtrain re-runs only on its own key
        assert ran_stages(out) == ran, out[-3000:]
    assert "fresh trajectories of 4 points a step, by the teacher (online)" in run(
        ["dvc", "queue", "logs", "queued-ect"], repo, env).stdout
    run(["dvc", "exp", "apply", "ict-lpips"], repo, env)
    assert all(math.isfinite(v) for v in read_metrics(repo)["fid"].values())
    assert "| midtrain → ct lpips (ict weighting)" in (repo / "reports/summary.md").read_text()


def test_a_sample_key_reruns_sampling_only(smoke_repo):
    repo, env, _ = smoke_repo
    r = run(["dvc", "exp", "run", "-S", "sample.steps=[1,2,3]", "-S", "sample.search_ts=true",
             "-n", "three-steps"], repo, env)
    out = r.stdout + r.stderr
    assert ran_stages(out) == {"sample", "copy_check", "evaluate", "report"}, out[-3000:]
    assert "cm_nfe3" in read_metrics(repo)["fid"]
    search = json.loads((repo / "reports/ts_search.json").read_text())
    assert set(search["chosen"]) == {"2", "3"}
    for k, ts in search["chosen"].items():
        assert len(ts) == int(k) and ts[0] == 0 and ts == sorted(set(ts))
        # a searched ts replaces the params' one only when it wins with confidence
        won = search["win_rate"].get(k, {}).get("win_rate", 0) >= search["confidence"]
        assert ts == search["params_ts"][k] or won, search
    assert all(math.isfinite(v) for v in search["fid"].values())
    summary = (repo / "reports/summary.md").read_text()
    for k, ts in search["chosen"].items():  # the table says whether the search replaced sample.ts
        label = "(searched)" if ts != search["params_ts"][k] else "(given; the search did not beat it)"
        assert re.search(r"\|\s*" + re.escape(f"{' '.join(map(str, ts))} {label}") + r"\s*\|", summary), summary


def test_exp_run_of_a_distill_key_reruns_distill_and_after_only(smoke_repo):
    repo, env, _ = smoke_repo
    # Online CD (the teacher's Heun step inside each training step) from the same teacher.
    r = run(["dvc", "exp", "run", "-S", "distill.lr=0.0003", "-S", "distill.pairs=online", "-n", "lr3e-4"],
            repo, env)
    out = r.stdout + r.stderr
    # trajectories re-runs on distill.pairs only to leave an empty cache that says why
    assert ran_stages(out) == {"trajectories", "distill", "sample", "copy_check", "evaluate", "edit",
                               "report"}, out[-3000:]
    assert "Heun pairs made in each step (online)" in out
    assert json.loads((repo / "data/trajectories/cache.json").read_text())["unused"] == "distill.pairs is online"
    m = read_metrics(repo)
    assert all(math.isfinite(v) for v in m["fid"].values())
    # The smoke params keep two evaluation EMAs: both scored, the lower FID chosen and saved as "ema".
    choice = json.loads((repo / "reports/distill/ema_selection.json").read_text())
    assert set(choice["fid"]) == {"ema_0.9", "ema_0.5"} and choice["chosen"] == min(choice["fid"], key=choice["fid"].get)
    show = run(["dvc", "exp", "show", "--no-pager", "--csv"], repo, env).stdout
    assert "lr3e-4" in show and "distill.lr" in show and "distill.pairs" in show


# distill resumes through the same loop and checkpoint code (tests/test_training.py checks its
# bit-exact resume); through dvc, the teacher stands for both.
@pytest.mark.parametrize("stage,out", [("teacher", "data/teacher/model.pt")])
def test_kill_9_mid_run_then_repro_resumes_from_the_checkpoint(smoke_repo, stage, out):
    import signal
    import time

    import torch

    repo, env, _ = smoke_repo
    _set_params(repo, **{f"{stage}__images": 2048, f"{stage}__checkpoint_every": 256})  # 64 steps, 8 per checkpoint
    run(["dvc", "repro", "-s", "teacher", "trajectories"] if stage == "distill" else ["dvc", "repro", "-s", "shard"],
        repo, env)
    resume = repo / "data/.resume" / f"{stage}.pt"
    proc = subprocess.Popen(["dvc", "repro", "-s", stage], cwd=repo, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not resume.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert resume.exists(), f"{stage} wrote no checkpoint before it ended"
    os.killpg(proc.pid, signal.SIGKILL)   # dvc and the stage: as a crash would
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    r = run(["dvc", "repro", "-s", stage], repo, env)
    m = re.search(rf"{stage}: resuming from data/.resume/{stage}.pt at step (\d+)/64", r.stdout + r.stderr)
    assert m and 8 <= int(m.group(1)) < 64, (r.stdout + r.stderr)[-3000:]
    assert not resume.exists()            # removed once the model is saved
    resumed = _weights(repo / out)

    run(["dvc", "repro", "-s", "-f", stage], repo, env)   # the same budget, uninterrupted
    straight = _weights(repo / out)
    for which in straight:
        for k in straight[which]:
            assert torch.equal(resumed[which][k], straight[which][k]), (which, k)


def test_torchrun_with_two_processes_gives_the_one_process_caches(smoke_repo):
    repo, env, _ = smoke_repo
    caches = ("data/trajectories/cache.json", "data/whole_trajectories/cache.json")
    before = [json.loads((repo / c).read_text()) for c in caches]
    _set_params(repo, dist__nproc_per_node=2)
    r = run([sys.executable, "-m", "cmpipe.pipeline.launch", "stages.trajectories"], repo, env)
    assert "torch.distributed.run --nproc_per_node=2" in r.stderr
    for c, b in zip(caches, before):  # the pairs and the whole trajectories, as one process made them
        after = json.loads((repo / c).read_text())
        assert b["shards"] and [s["sha256"] for s in after["shards"]] == [s["sha256"] for s in b["shards"]]
    assert json.loads((repo / "reports/trajectories.json").read_text())["processes"] == 2
    # distill (DDP) and sample (item-parallel) under torchrun through dvc: the CIFAR-10 GPU profile's
    # rehearsal (tests/test_gpu_profiles.py) runs them with 2 processes


def test_repro_runs_every_stage_and_writes_finite_metrics(smoke_repo):
    repo, env, out = smoke_repo
    assert ran_stages(out) == {"shard", "fid_ref", "teacher", "trajectories", "midtrain", "distill", "sample",
                               "copy_check", "evaluate", "edit", "report"}
    m = read_metrics(repo)
    names = {"cm_nfe1", "cm_nfe2", "teacher_heun_nfe7", "teacher_euler_nfe1", "teacher_euler_nfe2", "teacher_dpm_nfe2"}
    assert set(m["fid"]) == names and set(m["kid"]) == names
    assert all(math.isfinite(v) and v >= 0 for v in m["fid"].values())
    assert all(math.isfinite(v) for v in m["kid"].values())
    assert m["protocol"]["reference_count"] == 48
    summary = (repo / "reports/summary.md").read_text()
    assert "cm_nfe1" in summary and "![cm_nfe1](samples/cm_nfe1.png)" in summary
    assert "## Teacher NFE to match the consistency model" in summary
    assert summary.startswith("# Results\n\n- **What was made:** a consistency model")
    assert "![FID against NFE](figures/fid_vs_nfe.png)" in summary and "## Editing" in summary
    assert json.loads((repo / "reports/teacher/timing.json").read_text())["seconds"] > 0
    for png in ["reports/teacher/samples.png", "reports/midtrain/samples.png", "reports/distill/samples.png",
                "reports/samples/cm_nfe1.png", "reports/figures/fid_vs_nfe.png", "reports/figures/training_teacher.png"]:
        assert (repo / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # dvclive curves of the three training stages, by optimizer step (teacher: 512 images of 32)
    for stage in ("teacher", "midtrain", "distill"):
        assert (repo / f"reports/{stage}/plots/metrics/loss.tsv").exists()
    assert json.loads((repo / "reports/teacher/metrics.json").read_text())["step"] == 16
    copies = json.loads((repo / "reports/copy_check.json").read_text())
    assert set(copies["sets"]) == {"cm_nfe1", "teacher_heun_nfe7"}
    assert set(copies["sets"]["cm_nfe1"]) == {"cached_ends", "training_images"}
    edit = json.loads((repo / "reports/edit/metrics.json").read_text())
    for task in ("inpainting", "super_resolution"):
        assert all(math.isfinite(edit[task][k]) for k in ("psnr", "lpips", "baseline_psnr", "baseline_lpips"))
    assert "gray" in edit["colorization"]["skipped"]
    for png in ("inpainting", "super_resolution", "stroke", "interpolation"):
        assert (repo / f"reports/edit/{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    status = run(["dvc", "status"], repo, env).stdout
    assert "up to date" in status
    # The scope of a key: a midtrain key changes midtrain alone (what follows re-runs on its new
    # output), the trajectories' NFE the cache and midtrain, nothing before them.
    for changes, stages in (({"midtrain__lr": 0.0003}, {"midtrain"}),
                            ({"trajectories__nfe": 2}, {"trajectories", "midtrain"})):
        _set_params(repo, **changes)
        status = run(["dvc", "status", "--json"], repo, env).stdout
        assert set(json.loads(status)) == stages, status
        run(["git", "checkout", "params.yaml"], repo, env)
