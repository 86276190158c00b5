"""DVC stage `report`: reports/summary.md, the answer first (the consistency model's FID at 1 and 2
steps, the teacher's best, the NFE saved against DPM-Solver++ and the seconds per image), then the
table of every set, the protocol, the training, editing and copy check, and the sample grids; and
the figures it links, reports/figures/*.png (cmpipe.pipeline.report, cmpipe.pipeline.figures).

    python -m stages.report
"""
from __future__ import annotations

from cmpipe.errors import InputError
from cmpipe.pipeline.layout import (
    COPY_CHECK,
    DISTILL_REPORT,
    EDIT,
    EDIT_METRICS,
    FIGURES,
    METRICS,
    MIDTRAIN_REPORT,
    SAMPLE_GRIDS,
    SAMPLE_SETS,
    SAMPLE_TIMING,
    SUMMARY,
    TEACHER_REPORT,
    TRAJECTORIES_REPORT,
    TS_SEARCH,
)
from cmpipe.pipeline.report import (
    mark_ts_search,
    read_json,
    read_training_report,
    results_table,
    summary_markdown,
    write_figures,
)
from cmpipe.pipeline.stage import run_stage
from cmpipe.util.fileio import atomic_write_text

REPORTS = SUMMARY.parent
TRAINING = {"teacher": TEACHER_REPORT, "midtrain": MIDTRAIN_REPORT, "distill": DISTILL_REPORT}


def main():
    metrics = read_json(METRICS)
    sets = mark_ts_search(read_json(SAMPLE_SETS), read_json(TS_SEARCH))
    for name, t in read_json(SAMPLE_TIMING).items():
        if name in sets:
            sets[name]["seconds_per_image"] = t["seconds_per_image"]
    if not metrics or not sets:
        raise InputError(f"{METRICS} or {SAMPLE_SETS} is missing: run `dvc repro evaluate` first")
    figure_paths = write_figures(results_table(metrics, sets), TRAINING, FIGURES)
    text = summary_markdown(metrics, sets, SAMPLE_GRIDS, REPORTS,
                            training={stage: read_training_report(folder) for stage, folder in TRAINING.items()},
                            trajectories=read_json(TRAJECTORIES_REPORT), edit=read_json(EDIT_METRICS), edit_dir=EDIT,
                            copy_check=read_json(COPY_CHECK), figure_paths=figure_paths)
    atomic_write_text(SUMMARY, text)
    print(text)


if __name__ == "__main__":
    run_stage("report", main)
