"""DVC stage `report`: reports/summary.md, a table of set, NFE, FID, KID and seconds per image.

    python -m stages.report
"""
from __future__ import annotations

import json
from pathlib import Path

from cmpipe.fileio import atomic_write_text
from cmpipe.report import summary_markdown
from cmpipe.stage import run_stage

REPORTS = Path("reports")


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def main():
    metrics = _read(REPORTS / "metrics.json")
    sets = _read(Path("data/samples/sets.json"))
    for name, t in _read(REPORTS / "sample_timing.json").items():
        if name in sets:
            sets[name]["seconds_per_image"] = t["seconds_per_image"]
    if not metrics or not sets:
        raise FileNotFoundError("reports/metrics.json or data/samples/sets.json is missing: "
                                "run `dvc repro evaluate` first")
    extras = {"teacher training (last logged)": _read(REPORTS / "teacher/metrics.json"),
              "distillation (last logged)": _read(REPORTS / "distill/metrics.json"),
              "trajectory cache": _read(REPORTS / "trajectories.json")}
    text = summary_markdown(metrics, sets, extras, REPORTS / "samples", REPORTS)
    atomic_write_text(REPORTS / "summary.md", text)
    print(text)


if __name__ == "__main__":
    run_stage("report", main)
