"""The artifact paths of cmpipe.layout are the ones dvc.yaml declares."""
from pathlib import Path

import yaml

from cmpipe.pipeline import layout

REPO = Path(__file__).resolve().parents[1]


def _declared() -> tuple[set[str], set[str]]:
    """(outs, deps) of every stage of dvc.yaml, as path strings."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs, deps = set(), set()
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                outs.add(next(iter(entry)) if isinstance(entry, dict) else entry)
        deps.update(stage.get("deps", []))
    return outs, deps


def _paths() -> dict[str, Path]:
    return {k: v for k, v in vars(layout).items() if isinstance(v, Path)}


def test_every_artifact_is_a_declared_output_or_inside_one():
    outs, _ = _declared()
    for name, path in _paths().items():
        if path == layout.RESUME or layout.RESUME in path.parents:
            continue  # checkpoints of an unfinished stage: not a DVC output
        inside = [o for o in outs if path == Path(o) or Path(o) in path.parents]
        assert inside, f"layout.{name} = {path} is no output of dvc.yaml (nor inside one)"


def test_every_declared_output_has_a_name():
    outs, _ = _declared()
    named = {str(p) for p in _paths().values()} | {str(p.parent) for p in _paths().values()}
    missing = sorted(o for o in outs if o not in named)
    assert not missing, f"dvc.yaml outputs without a name in cmpipe.layout: {missing}"


def test_data_deps_are_layout_paths():
    _, deps = _declared()
    named = {str(p) for p in _paths().values()} | {str(p.parent) for p in _paths().values()}
    data = sorted(d for d in deps if d.startswith(("data/", "reports/")))
    assert data and all(d in named for d in data), [d for d in data if d not in named]


def test_resume_checkpoints_stay_out_of_git():
    ignored = (REPO / ".gitignore").read_text().split()
    assert any(line.strip("/") == "data" or line.startswith("/data") for line in ignored)
