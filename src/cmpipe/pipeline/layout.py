"""Where the pipeline's artifacts live, relative to the repository root.

One name per path, shared by the stages that write and read it. dvc.yaml states the
same paths as the stages' deps and outs (tests/test_layout.py checks that they agree).
"""
from __future__ import annotations

from pathlib import Path

SHARDS = Path("data/shards")
MANIFEST = SHARDS / "manifest.json"
FID_REF = Path("data/fid_ref.npz")

TEACHER = Path("data/teacher/model.pt")
TEACHER_REPORT = Path("reports/teacher")

TRAJECTORIES = Path("data/trajectories")  # CD's Heun pairs: shards/ and cache.json
WHOLE_TRAJECTORIES = Path("data/whole_trajectories")  # midtrain's whole DPM-Solver++ trajectories: shards/, cache.json
TRAJECTORIES_REPORT = Path("reports/trajectories.json")

MIDTRAIN = Path("data/midtrain/model.pt")
MIDTRAIN_REPORT = Path("reports/midtrain")

STUDENT = Path("data/student/model.pt")
DISTILL_REPORT = Path("reports/distill")
# In each training stage's reports: the choice of the evaluation EMA (cmpipe.training.selection).
EMA_SELECTION_NAME = "ema_selection.json"
# ... and the wall time of its training loop (cmpipe.pipeline.training_stage), for the summary.
TRAINING_TIME_NAME = "timing.json"
TEACHER_EMA_SELECTION = TEACHER_REPORT / EMA_SELECTION_NAME
DISTILL_EMA_SELECTION = DISTILL_REPORT / EMA_SELECTION_NAME

SAMPLES = Path("data/samples")
SAMPLE_SETS = SAMPLES / "sets.json"
SAMPLE_GRIDS = Path("reports/samples")
TS_SEARCH = Path("reports/ts_search.json")
COPY_CHECK = Path("reports/copy_check.json")
SAMPLE_TIMING = Path("reports/sample_timing.json")

METRICS = Path("reports/metrics.json")
FID_PLOT = Path("reports/fid_vs_nfe.csv")
EDIT = Path("reports/edit")
EDIT_METRICS = EDIT / "metrics.json"
SUMMARY = Path("reports/summary.md")
# The summary's PNG figures (cmpipe.pipeline.figures): fid_vs_nfe.png and training_<stage>.png.
FIGURES = Path("reports/figures")

# Resumable checkpoints of the training stages: not DVC outputs (a finished stage removes its
# own), kept out of git by data/ being ignored.
RESUME = Path("data/.resume")
TEACHER_RESUME = RESUME / "teacher.pt"
DISTILL_RESUME = RESUME / "distill.pt"
MIDTRAIN_RESUME = RESUME / "midtrain.pt"
