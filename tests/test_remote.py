"""A finished run shared through a DVC remote (README, "Sharing a run through a DVC remote"):
push to a local-folder remote, a fresh `git clone`, `dvc pull`, `dvc status` clean, and the
pulled consistency model samples with `python -m cmpipe.export.generate`, no stage run.

Works in a copy of the smoke project that tests/test_pipeline.py builds once per session (its
`dvc repro` is not repeated here). The file sorts after test_pipeline.py, so `make test` (slow
tests first, conftest.py) schedules this test after that file's long runs.
"""
import sys

import numpy as np
import pytest
import yaml
from conftest import GIT, repo_env, run
from test_pipeline import smoke_base, smoke_repo  # noqa: F401  (fixtures: the shared smoke project)

pytestmark = pytest.mark.slow

UP_TO_DATE = "Data and pipelines are up to date."


def test_a_clone_pulls_the_run_from_a_local_remote_and_samples_without_retraining(smoke_repo, tmp_path):
    from PIL import Image

    repo, env, _ = smoke_repo
    # What a user does after `dvc repro` (the smoke project's results, dvc.lock and the
    # cache: false reports, are committed already): add a default remote, commit its config, push.
    store = tmp_path / "dvc-store"
    run(["dvc", "remote", "add", "-d", "store", str(store)], repo, env)
    run(GIT + ["commit", "-qm", "dvc remote: store", "--", ".dvc/config"], repo, env)
    assert run(["git", "status", "--porcelain"], repo, env).stdout == ""   # nothing else a clone would miss
    run(["dvc", "push"], repo, env)
    assert any(store.rglob("*")), "dvc push wrote nothing to the remote"

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    cenv = repo_env(clone)
    assert not (clone / "data").exists() and not (clone / ".dvc/cache").exists()  # only git's files
    assert (clone / "reports/summary.md").exists()                              # cache: false outs are in git
    assert run(["dvc", "cache", "dir"], clone, cenv).stdout.strip() == str(clone / ".dvc/cache")
    lock = (clone / "dvc.lock").read_text()

    run(["dvc", "pull"], clone, cenv)
    for out in ("data/shards/manifest.json", "data/fid_ref.npz", "data/teacher/model.pt",
                "data/whole_trajectories/cache.json", "data/student/model.pt", "data/samples/cm_nfe2.npz"):
        assert (clone / out).is_file(), out
    status = run(["dvc", "status"], clone, cenv)
    assert status.stdout.strip() == UP_TO_DATE, status.stdout + status.stderr
    cloud = run(["dvc", "status", "--cloud"], clone, cenv).stdout
    assert "in sync" in cloud, cloud

    # The pulled model samples; with the params' seed, batch size and ts, the sample stage's images.
    sample = yaml.safe_load((clone / "params.yaml").read_text())["sample"]
    n, gen = sample["count"], tmp_path / "gen"
    r = run([sys.executable, "-m", "cmpipe.export.generate", "--model", "data/student/model.pt",
             "--params", "params.yaml", "--steps", "2", "--count", str(n), "--seed", str(sample["seed"]),
             "--batch-size", str(sample["batch_size"]), "--out", str(gen)], clone, cenv)
    assert f"wrote {n} images" in r.stdout, r.stdout + r.stderr
    got = np.stack([np.asarray(Image.open(gen / f"{i:06d}.png")) for i in range(n)]).astype(int)
    with np.load(clone / "data/samples/cm_nfe2.npz") as z:
        want = z["images"][..., 0].astype(int)
    assert got.shape == want.shape and got.ndim == 3
    # the same model, noise, sampler and batch size on the same machine: the same bytes
    assert np.array_equal(got, want), f"{(got != want).sum()} pixels differ, by up to {np.abs(got - want).max()}"
    assert (gen / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # nothing re-ran or changed: the clone is still the committed run
    assert run(["dvc", "status"], clone, cenv).stdout.strip() == UP_TO_DATE
    assert (clone / "dvc.lock").read_text() == lock
    assert run(["git", "status", "--porcelain"], clone, cenv).stdout == ""
