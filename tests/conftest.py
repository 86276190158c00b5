import os
import sys
from pathlib import Path

# See stages/__init__.py: spinning OpenMP threads collapse throughput on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under `pytest -n N` (pytest-xdist) each worker, and every stage it starts, gets its share of
# the cores: N workers that each used all of them ran the suite slower than one worker did
# (measured on 2 cores: 661 s with two workers of two threads, 619 s with one busy worker).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

ROOT = Path(__file__).resolve().parents[1]
# Reference files for tests, copied from ../shared/testdata so a clean clone has them
# (testdata/lpips: the LPIPS authors' example images, BSD-2-Clause, see its LICENSE).
TESTDATA = ROOT / "tests" / "data"
sys.path.insert(0, str(ROOT))


def tiny_unet(channels: int = 1, seed: int = 0, res: int = 8, num_classes: int | None = None):
    """(config, UNet2DModel) of a two-level 8/16-channel UNet with its weights moved away from
    the initialisation, so every weight (and the class embedding) matters in a comparison."""
    import torch

    from cmpipe.models import networks

    torch.manual_seed(seed)
    cfg = networks.unet_config([8, 16], 1, [], 0.0, res, channels, num_classes)
    net = networks.build_unet(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, net.eval()


def save_ddpm_dir(directory: Path, seed: int, channels: int = 1) -> Path:
    """A diffusers directory as published DDPM models are: an ε UNet2DModel and its DDPMScheduler."""
    from diffusers import DDPMScheduler

    _, net = tiny_unet(channels, seed)
    net.save_pretrained(directory / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(directory / "scheduler")
    return directory


class Boom:
    """Unpickling this would create a folder: the proof that nothing got unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# ------------------------------------------------------------------ project repositories for dvc
GIT = ["git", "-c", "user.name=cmpipe tests", "-c", "user.email=tests@cmpipe.invalid"]


def run(cmd, cwd, env, check=True):
    """A subprocess whose output goes into the assertion message when it fails."""
    import subprocess

    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def repo_env(repo: Path) -> dict:
    """The environment that runs `dvc` in `repo` with this interpreter and the repo's own src/."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                PYTHONPATH=str(repo / "src"), DVC_NO_ANALYTICS="1")


def project_repo(repo: Path, params_text: str) -> dict:
    """A new git repository holding the project (as `git ls-files` sees it, without its results
    and tests) with `params_text` as params.yaml, committed; returns its environment."""
    import shutil
    import subprocess

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for f in files:
        if f and (ROOT / f).is_file() and not f.startswith(("reports/", "dvc.lock", "tests/")):
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    (repo / "params.yaml").write_text(params_text)
    env = repo_env(repo)
    run(["git", "init", "-q"], repo, env)
    run(GIT + ["add", "-A"], repo, env)
    run(GIT + ["commit", "-qm", "project"], repo, env)
    return env


def pytest_collection_modifyitems(config, items):
    # The end-to-end runs first, in their file's order: `pytest -n 2` (pytest-xdist) deals the
    # first tests out in turn, so the long runs go to both workers and the short tests fill in.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
