"""DVC stage `report`: reports/summary.md, a table of set, NFE, FID, KID and seconds per image.

    python -m stages.report
"""
from __future__ import annotations

import json
from pathlib import Path

from cmpipe.errors import InputError
from cmpipe.pipeline.layout import (
    COPY_CHECK,
    DISTILL_EMA_SELECTION,
    DISTILL_REPORT,
    METRICS,
    MIDTRAIN_REPORT,
    SAMPLE_GRIDS,
    SAMPLE_SETS,
    SAMPLE_TIMING,
    SUMMARY,
    TEACHER_EMA_SELECTION,
    TEACHER_REPORT,
    TRAJECTORIES_REPORT,
)
from cmpipe.pipeline.stage import run_stage
from cmpipe.pipeline.report import summary_markdown
from cmpipe.util.fileio import atomic_write_text

REPORTS = SUMMARY.parent


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as e:  # a JSONDecodeError is a ValueError
        raise InputError(f"{path}: unreadable ({e}); rerun the stage that writes it (`dvc repro -f`)") from None


def main():
    metrics = _read(METRICS)
    sets = _read(SAMPLE_SETS)
    for name, t in _read(SAMPLE_TIMING).items():
        if name in sets:
            sets[name]["seconds_per_image"] = t["seconds_per_image"]
    if not metrics or not sets:
        raise InputError(f"{METRICS} or {SAMPLE_SETS} is missing: run `dvc repro evaluate` first")
    extras = {"teacher training (last logged)": _read(TEACHER_REPORT / "metrics.json"),
              "teacher evaluation EMA (held-out FID after the last step)": _read(TEACHER_EMA_SELECTION),
              "mid-training (last logged)": _read(MIDTRAIN_REPORT / "metrics.json"),
              "mid-trained evaluation EMA (held-out one-step FID after the last step)":
                  _read(MIDTRAIN_REPORT / "ema_selection.json"),
              "distillation (last logged)": _read(DISTILL_REPORT / "metrics.json"),
              "consistency model evaluation EMA (held-out one-step FID after the last step)":
                  _read(DISTILL_EMA_SELECTION),
              "trajectory cache": _read(TRAJECTORIES_REPORT)}
    text = summary_markdown(metrics, sets, extras, SAMPLE_GRIDS, REPORTS, _read(COPY_CHECK))
    atomic_write_text(SUMMARY, text)
    print(text)


if __name__ == "__main__":
    run_stage("report", main)
