"""The markdown summary of a run (reports/summary.md), the answer first.

A few lines say what was made and how good it is (`headline`); then the table behind them, the
teacher NFE that match the consistency model, the evaluation protocol, the training of each
stage, the editing tasks, the copy check, and the sample grids at the end. The figures are
drawn by cmpipe.pipeline.figures (`write_figures`) and linked from the text.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from cmpipe.errors import InputError
from cmpipe.pipeline import figures
from cmpipe.pipeline.layout import EMA_SELECTION_NAME, TRAINING_TIME_NAME
from cmpipe.sampling.kinds import KINDS, SAMPLER_NAMES, TEACHER_KINDS, set_name

# The teacher's samplers, in the order of the summary, and their names there.
TEACHER_SAMPLERS = {kind: SAMPLER_NAMES[kind] for kind in TEACHER_KINDS}
# The headline measures the NFE saving against the teacher's best few-step solver, and quotes the
# teacher's best quality as its lowest FID, beside Heun at its largest NFE (EDM's sampler) when they differ.
FEW_STEP = "teacher_dpm"
BEST = "teacher_heun"
# The training stages in pipeline order: their title in the summary and what their budget counts.
TRAINING_STAGES = {"teacher": ("Teacher (EDM denoiser)", "training images"),
                   "midtrain": ("Mid-training (Consistency Mid-Training)", "trajectory points"),
                   "distill": ("Post-training (distill)", "training images")}
# The editing tasks scored against a baseline, with their names in the summary.
EDIT_TASKS = {"inpainting": "inpainting", "colorization": "colorization", "super_resolution": "super-resolution"}
EDIT_GRIDS_ONLY = {"stroke": "stroke-guided editing", "interpolation": "interpolation"}


def read_json(path: Path) -> dict:
    """A JSON report, or {} when it is absent (an optional input); an unreadable one is an InputError."""
    path = Path(path)
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as e:  # a JSONDecodeError is a ValueError
        raise InputError(f"{path}: unreadable ({e}); rerun the stage that writes it (`dvc repro -f`)") from None


def read_training_report(folder: Path) -> dict:
    """What a training stage leaves in its report folder for the summary: dvclive's last row
    (metrics), the EMA choice (selection), the loop's wall time (timing), or why it did not run."""
    folder = Path(folder)
    return {"metrics": read_json(folder / "metrics.json"), "selection": read_json(folder / EMA_SELECTION_NAME),
            "timing": read_json(folder / TRAINING_TIME_NAME), "unused": read_json(folder / "unused.json")}


def mark_ts_search(sets: dict, search: dict) -> dict:
    """sets.json marks every cm set the ts search ran for as ts_searched; mark ts_kept where the
    search's best lost to sample.ts (reports/ts_search.json's params_ts, kept unless beaten with
    confidence), so that the table does not call the given ts a searched one."""
    for steps, given in (search.get("params_ts") or {}).items():
        info = sets.get(set_name("cm", int(steps)))
        if info and info.get("ts_searched"):
            info["ts_kept"] = list(info.get("ts", [])) == list(given)
    return sets


def ts_label(info: dict) -> str:
    ts = " ".join(map(str, info.get("ts", [])))
    if info.get("ts_kept"):
        return f"{ts} (given; the search did not beat it)"
    return f"{ts} (searched)" if info.get("ts_searched") else ts


def results_table(metrics: dict, sets: dict) -> pd.DataFrame:
    """One row per sample set: the consistency model's steps first, then each teacher sampler (in
    the order of cmpipe.sampling.kinds), each by NFE. Column sampler holds the kind."""
    rows = []
    for name, info in sets.items():
        made_by = info.get("model") or {}
        model = " ".join(made_by.get(k, "") for k in ("mode", "metric")).strip()
        if made_by.get("weighting", "uniform") != "uniform":
            model += f" ({made_by['weighting']} weighting)"
        if made_by.get("init") == "midtrain":  # post-trained from the mid-trained model
            model = f"midtrain → {model}"
        rows.append({"set": name, "sampler": info["kind"], "model": model or "teacher", "NFE": info["nfe"],
                     "ts": ts_label(info),
                     "FID": metrics.get("fid", {}).get(name), "KID": metrics.get("kid", {}).get(name),
                     "s/image": info.get("seconds_per_image"), "images": info.get("count"),
                     "device": info.get("device")})
    order = {kind: i for i, kind in enumerate(KINDS)}
    table = pd.DataFrame(rows)
    table["_order"] = table["sampler"].map(order).fillna(len(order))
    return table.sort_values(["_order", "NFE", "set"]).drop(columns="_order").reset_index(drop=True)


def table_markdown(table: pd.DataFrame) -> str:
    shown = table.drop(columns="device").assign(sampler=table["sampler"].map(lambda k: SAMPLER_NAMES.get(k, k)))
    return shown.to_markdown(index=False, floatfmt=".4g", missingval="-")


def crossing(target: float, nfe: list[int], fid: list[float]) -> dict:
    """Where a FID-against-NFE curve first reaches `target` (FID at most it): `nfe`, the smallest
    evaluated NFE that does (None if none); `bracket`, that NFE and the one before it when the one
    before is above the target; `interpolated`, the crossing on the line between the bracket,
    linear in log NFE (None without a bracket). `nfe` ascending, `fid` aligned with it."""
    hit = next((i for i, f in enumerate(fid) if f <= target), None)
    if not hit:  # None (never reached) or 0 (reached at the smallest NFE: nothing below to interpolate from)
        return {"nfe": None if hit is None else nfe[hit], "bracket": None, "interpolated": None}
    (n0, n1), (f0, f1) = nfe[hit - 1:hit + 1], fid[hit - 1:hit + 1]
    w = (f0 - target) / (f0 - f1)
    return {"nfe": nfe[hit], "bracket": (n0, n1),
            "interpolated": math.exp((1 - w) * math.log(n0) + w * math.log(n1))}


def _curve(rows: pd.DataFrame, kind: str) -> tuple[list[int], list[float]]:
    t = rows[rows["sampler"] == kind].sort_values("NFE")
    return [int(n) for n in t["NFE"]], [float(f) for f in t["FID"]]


def teacher_nfe_to_match(table: pd.DataFrame) -> list[dict]:
    """How many teacher NFE match each consistency-model set's FID (Song et al. 2023 compare
    one- and two-step CD with the teacher's samplers by FID against NFE).

    For each cm set and each teacher sampler with an evaluated set: `nfe`, the smallest evaluated
    NFE whose FID is at most the cm set's (None if none is), `best_fid` and `best_nfe`, and
    `interpolated_nfe`, where FID crosses the cm's FID on the line through the last NFE above it
    and the match, linear in log NFE (None when the match is the smallest evaluated NFE).
    `table` has columns set, sampler, NFE, FID (`results_table`); sets without a FID are left out.
    """
    rows = table.dropna(subset=["FID"])
    out = []
    for _, cm in rows[rows["sampler"] == "cm"].sort_values("NFE").iterrows():
        for sampler in TEACHER_SAMPLERS:
            nfe, fid = _curve(rows, sampler)
            if not nfe:
                continue
            c = crossing(float(cm["FID"]), nfe, fid)
            best = min(range(len(fid)), key=fid.__getitem__)
            out.append({"cm_set": cm["set"], "cm_nfe": int(cm["NFE"]), "cm_fid": float(cm["FID"]),
                        "sampler": sampler, "nfe": c["nfe"], "smallest_nfe": nfe[0], "bracket": c["bracket"],
                        "interpolated_nfe": c["interpolated"], "best_fid": fid[best], "best_nfe": nfe[best]})
    return out


def _steps(n: int) -> str:
    return f"{n} step{'s' * (n != 1)}"


def match_markdown(matches: list[dict]) -> list[str]:
    """The lines of the summary's section on `teacher_nfe_to_match`. A match at the smallest
    evaluated NFE says so (the curve may cross lower), and the interpolated column is left out
    when no curve brackets a crossing."""
    if not matches:
        return []

    def smallest(m):
        if m["nfe"] is None:
            return f"none of the evaluated NFE (best: {m['best_fid']:.4g} at NFE {m['best_nfe']})"
        return f"{m['nfe']} (the smallest evaluated: perhaps fewer)" if m["nfe"] == m["smallest_nfe"] else m["nfe"]

    rows = [{"consistency model": f"{_steps(m['cm_nfe'])} (FID {m['cm_fid']:.4g})",
             "teacher sampler": TEACHER_SAMPLERS[m["sampler"]],
             "smallest NFE with FID at most the cm's": smallest(m),
             "interpolated (log NFE)": f"{m['interpolated_nfe']:.3g} (between NFE {m['bracket'][0]} and "
                                       f"{m['bracket'][1]})" if m["bracket"] else "-"}
            for m in matches]
    table = pd.DataFrame(rows)
    interpolated = any(m["bracket"] for m in matches)
    if not interpolated:
        table = table.drop(columns="interpolated (log NFE)")
    why = ("The smallest evaluated teacher NFE whose FID is at most the consistency model's"
           + (", and the NFE where the teacher's FID crosses it, interpolated linearly in log NFE between the "
              "bracketing evaluated NFE." if interpolated else
              "; no teacher curve brackets a crossing, so there is nothing to interpolate (evaluate more NFE: "
              "`sample.teacher_dpm_nfe`, `sample.teacher_heun_nfe`)."))
    return ["## Teacher NFE to match the consistency model", "", why, "", table.to_markdown(index=False), ""]


# The words for a training mode in the headline (results_table's model column: "midtrain l2", "midtrain → cd lpips").
MODES = {"midtrain": "Consistency Mid-Training", "cd": "consistency distillation", "ct": "consistency training",
         "ect": "Easy Consistency Tuning"}


def _describe(model: str) -> str:
    """"midtrain → cd lpips" -> "Consistency Mid-Training, then consistency distillation, lpips metric"."""
    parts = []
    for part in model.split(" → "):
        mode, _, rest = part.partition(" ")
        parts.append(MODES.get(mode, mode) + (f", {rest} metric" if rest else ""))
    return ", then ".join(parts)


def _fid(x: float) -> str:
    return f"{x:.4g}"


def _spi(x) -> str:
    return f"{x:.2g} s" if x is not None and not pd.isna(x) else "not timed"


def headline(table: pd.DataFrame, protocol: dict | None = None) -> list[str]:
    """The summary's first lines, the answer in words and numbers: the consistency model's FID at
    1 and 2 steps (all its steps when neither was sampled), the teacher's best (its lowest FID, and Heun
    at its largest NFE when that is another set), the NFE DPM-Solver++ needs to match each (interpolated in log NFE
    where its curve brackets the FID, else not reached within the evaluated NFE), and the seconds
    per image of each."""
    rows = table.dropna(subset=["FID"])
    cm = rows[rows["sampler"] == "cm"].sort_values("NFE")
    if cm.empty:
        return ["No consistency-model set has a FID in this run: see the table below."]
    few = cm[cm["NFE"] <= 2] if (cm["NFE"] <= 2).any() else cm
    proto = protocol or {}
    counts = sorted(set((proto.get("samples_per_set") or {}).values()))
    scale = (f"{counts[0]:,} samples per set" if len(counts) == 1 else
             "samples per set as in the protocol below" if counts else "")
    if proto.get("reference_count"):
        scale += f" against {proto['reference_count']:,} {proto.get('reference_split', 'reference')} images"
    scale = f"{scale}; lower is better" if scale else "lower is better"
    fids = " and ".join(f"{_fid(r['FID'])} in {_steps(int(r['NFE']))}" for _, r in few.iterrows())
    made = _describe(few["model"].iloc[0])
    lines = [f"**What was made:** a consistency model ({made}) from an EDM teacher. It reaches FID {fids} ({scale})."]

    teacher = rows[rows["sampler"] != "cm"]
    best = heun_top = None
    if not teacher.empty:
        # The lowest FID of any teacher set; at small NFE a truncated solver can score below the
        # most accurate ODE solution (Heun at its largest NFE), so both are quoted when they differ.
        best = teacher.sort_values(["FID", "NFE"]).iloc[0]
        heun = teacher[teacher["sampler"] == BEST].sort_values("NFE")
        heun_top = heun.iloc[-1] if not heun.empty else None
        said = f"{SAMPLER_NAMES[best['sampler']]} at {int(best['NFE'])} NFE: FID {_fid(best['FID'])}"
        if heun_top is None:
            line = f"{said} (its lowest FID; Heun was not evaluated)."
        elif heun_top.name == best.name:
            line = f"{said}, its lowest FID of the evaluated sets and its most accurate ODE solution."
        else:
            line = (f"{said}, its lowest FID of the evaluated sets; Heun at its largest evaluated NFE, "
                    f"{int(heun_top['NFE'])} (the most accurate ODE solution here), scores {_fid(heun_top['FID'])}.")
        lines.append(f"**The teacher's best:** {line}")

    dpm_nfe, dpm_fid = _curve(rows, FEW_STEP)
    dpm_used = []  # the DPM-Solver++ NFE that the saving quotes, for their seconds per image
    if dpm_nfe:
        span = f"{dpm_nfe[0]}" if len(dpm_nfe) == 1 else f"{dpm_nfe[0]} to {dpm_nfe[-1]}"
        parts = []
        for _, r in few.iterrows():
            k, f = int(r["NFE"]), float(r["FID"])
            c = crossing(f, dpm_nfe, dpm_fid)
            if c["interpolated"] is not None:
                x = c["interpolated"]
                parts.append(f"{_steps(k)} (FID {_fid(f)}): ≈ {x:.3g} NFE, interpolated in log NFE between "
                             f"{c['bracket'][0]} and {c['bracket'][1]}: {x / k:.2g}× the consistency model's NFE")
                dpm_used.append(c["nfe"])
            elif c["nfe"] is not None:
                parts.append(f"{_steps(k)} (FID {_fid(f)}): matched already at the smallest evaluated NFE, "
                             f"{c['nfe']} (FID {_fid(dpm_fid[0])}): a saving of at most {c['nfe'] / k:.2g}×")
                dpm_used.append(c["nfe"])
            else:
                b = min(range(len(dpm_fid)), key=dpm_fid.__getitem__)
                parts.append(f"{_steps(k)} (FID {_fid(f)}): not reached within the evaluated NFE "
                             f"(best FID {_fid(dpm_fid[b])} at NFE {dpm_nfe[b]})")
                dpm_used.append(dpm_nfe[b])
        lines.append(f"**NFE saved against {SAMPLER_NAMES[FEW_STEP]}**, the teacher's best few-step solver "
                     f"(evaluated at NFE {span}), to reach the consistency model's FID: " + "; ".join(parts) + ".")
    else:
        lines.append(f"**NFE saved:** not measured: the teacher's {SAMPLER_NAMES[FEW_STEP]} was not evaluated "
                     "(`sample.teacher_dpm_nfe` is empty).")

    device = next((d for d in cm["device"] if isinstance(d, str)), None)
    speed = ["consistency model " + ", ".join(f"{_spi(r['s/image'])} ({_steps(int(r['NFE']))})"
                                              for _, r in few.iterrows())]
    if best is not None and best["sampler"] == FEW_STEP:
        dpm_used.append(best["NFE"])  # the teacher's lowest FID, quoted with the saving's NFE
    dpm = rows[(rows["sampler"] == FEW_STEP) & rows["NFE"].isin(dpm_used)].sort_values("NFE")
    if not dpm.empty:
        speed.append(f"{SAMPLER_NAMES[FEW_STEP]} " + ", ".join(f"{_spi(r['s/image'])} ({int(r['NFE'])} NFE)"
                                                               for _, r in dpm.iterrows()))
    quoted = {} if best is None else {best.name: best}
    if heun_top is not None:
        quoted[heun_top.name] = heun_top
    for r in quoted.values():
        if r["sampler"] == FEW_STEP and r["NFE"] in dpm_used:
            continue  # already in the DPM-Solver++ part
        slower = r["s/image"] / few["s/image"].iloc[0] if few["s/image"].iloc[0] else None
        speed.append(f"{SAMPLER_NAMES[r['sampler']]} {_spi(r['s/image'])} ({int(r['NFE'])} NFE"
                     + (f", {slower:.0f}× the {int(few['NFE'].iloc[0])}-step model's" if slower and
                        not pd.isna(slower) else "") + ")")
    lines.append("**Seconds per image**" + (f" (on {device})" if device else "") + ": " + "; ".join(speed) + ".")
    return ["- " + line for line in lines]


def _kv_table(rows: list[tuple[str, str]], head: tuple[str, str] = ("", "")) -> list[str]:
    """A two-column markdown table of (what, value) rows."""
    return [f"| {head[0]} | {head[1]} |", "|:--|:--|"] + [f"| {k} | {v} |" for k, v in rows]


def protocol_markdown(proto: dict) -> list[str]:
    """The evaluation protocol (reports/metrics.json's "protocol") as a short table."""
    lines = ["## Protocol", ""]
    if not proto:
        return lines + ["reports/metrics.json records no protocol.", ""]
    counts = proto.get("samples_per_set") or {}
    distinct = sorted(set(counts.values()))
    samples = (f"{distinct[0]:,} in every set" if len(distinct) == 1
               else ", ".join(f"{name} {n:,}" for name, n in counts.items()))
    rows = [("samples per set", samples),
            ("reference", (f"{proto.get('reference_count', 0):,} images of the {proto.get('reference_split')} split "
                          "(`data/fid_ref.npz`)")),
            ("FID", f"clean-fid {proto.get('cleanfid_version', '?')}, mode `{proto.get('mode')}`"
                    + (f", on {proto['device']}" if proto.get("device") else ""))]
    sizes = sorted(set((proto.get("kid_subset_size") or {}).values()))
    if proto.get("kid_subsets") and sizes:
        rows.append(("KID", f"{proto['kid_subsets']} subsets of "
                            + (f"{sizes[0]:,}" if len(sizes) == 1 else "/".join(map(str, sizes))) + " samples"))
    inc = proto.get("inception") or {}
    if inc:
        rows.append(("Inception", f"`{inc.get('name')}`" + (f" ({inc['origin']})" if inc.get("origin") else "")
                                  + f", sha1 `{inc.get('sha1')}`"))
    return lines + _kv_table(rows) + ["", ("FID of small sample sets is biased upward: compare sets of equal size "
                                          "only."), ""]


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _stage_markdown(stage: str, report: dict, figure: str | None) -> list[str]:
    title, unit = TRAINING_STAGES[stage]
    m, sel, timing = report.get("metrics") or {}, report.get("selection") or {}, report.get("timing") or {}
    if report.get("unused"):
        return [f"### {title}", "", f"Not run: {report['unused'].get('unused', 'nothing reads it')}.", ""]
    if not m and sel.get("adopted_from"):
        return [f"### {title}", "", f"Trains nothing: the consistency model is `{sel['adopted_from']}` as it is.", ""]
    if not m:
        return [f"### {title}", "", "No training report (metrics.json is missing).", ""] + (
            [f"![{title}: loss and held-out FID]({figure})", ""] if figure else [])
    rows = [(unit, f"{m.get('images', 0):,}")]
    if m.get("step"):
        rows.append(("optimizer steps", f"{m['step']:,} ({m['images'] / m['step']:g} a step)"))
    wall = timing.get("seconds")
    rows.append(("wall time", "not recorded by this run" if wall is None
                 else f"{_minutes(wall)} (training loop and held-out FIDs)"))
    if m.get("images_per_sec"):
        rows.append(("throughput", f"{m['images_per_sec']:.0f} {unit} a second (last logged interval)"))
    if m.get("loss") is not None:
        rows.append(("final loss", f"{m['loss']:.4g}"))
    fids = sel.get("fid") or {}
    decays = sel.get("decays") or {}
    chosen = sel.get("chosen")
    if chosen:
        ema = f"`{chosen}` (decay {sel.get('chosen_decay', decays.get(chosen)):g})"
        if chosen in fids:
            ema += (f", held-out FID {_fid(fids[chosen])} ({sel.get('count')} samples, seed {sel.get('seed')}, "
                    f"after {sel.get('images', m.get('images', 0)):,} {unit})")
        rows.append(("evaluation EMA", ema))
        others = [f"`{n}` (decay {decays.get(n, float('nan')):g}) {_fid(f)}" for n, f in sorted(fids.items())
                  if n != chosen]
        if others:
            rows.append(("other EMAs, held-out FID", ", ".join(others)))
    lines = [f"### {title}", ""] + _kv_table(rows) + [""]
    if figure:
        lines += [f"![{title}: loss and held-out FID]({figure})", ""]
    return lines


def _cache_markdown(traj: dict) -> list[str]:
    """One line on the trajectory caches (reports/trajectories.json)."""
    if not traj:
        return []
    parts = []
    whole = traj.get("trajectories") or {}
    if whole.get("count"):
        parts.append(f"{whole['count']:,} whole DPM-Solver++ trajectories of {whole.get('nfe')} NFE in "
                     f"{_minutes(whole['seconds'])} ({whole.get('trajectories_per_sec', 0):.0f} a second)")
    elif whole.get("unused"):
        parts.append(f"no whole trajectories: {whole['unused']}")
    if traj.get("pairs"):
        parts.append(f"{traj['pairs']:,} Heun pairs in {_minutes(traj['seconds'])}" if traj.get("seconds")
                     else f"{traj['pairs']:,} Heun pairs")
    elif traj.get("unused"):
        parts.append(f"no Heun pairs: {traj['unused']}")
    where = f" on {traj['device']}" if traj.get("device") else ""
    return [f"**Trajectory cache**{where}: " + "; ".join(parts) + ".", ""] if parts else []


def training_markdown(stages: dict[str, dict], trajectories: dict | None = None,
                      figure_links: dict[str, str] | None = None, cm_fid_1step: float | None = None) -> list[str]:
    """The training of each stage as a small table, after one sentence on what the held-out FID is."""
    if not stages:
        return []
    links = figure_links or {}
    # The held-out FID of the consistency model's own stage, beside the table's one-step FID, shows the gap.
    example = ""
    for stage in ("distill", "midtrain"):
        sel = (stages.get(stage) or {}).get("selection") or {}
        if sel.get("chosen") in (sel.get("fid") or {}) and cm_fid_1step is not None:
            example = (f": the consistency model's one step scores {_fid(sel['fid'][sel['chosen']])} held out in "
                       f"`{stage}` and {_fid(cm_fid_1step)} in the table")
            break
    lines = ["## Training", "",
             ("Held-out FID: each evaluation EMA draws a small set of samples (the count below) from the stage's "
             "own seed, not the evaluation sets' noises (the teacher with DPM-Solver++(2M) at "
             "`teacher.heldout_fid_nfe` NFE, the consistency models in one step), scored against the same "
             "reference statistics as the table. With so few samples FID is biased upward: the held-out FID ranks "
             f"the EMAs and draws the training curves, but reads higher than the table's FID{example}."), ""]
    for stage in TRAINING_STAGES:
        if stage in stages:
            lines += _stage_markdown(stage, stages[stage], links.get(stage))
    return lines + _cache_markdown(trajectories or {})


def edit_markdown(edit: dict, grid_links: dict[str, str] | None = None) -> list[str]:
    """The editing tasks (reports/edit/metrics.json), each scored task's PSNR and LPIPS against its
    baseline's, and the tasks that are grids only. `grid_links`: task -> link to its grid."""
    lines = ["## Editing", ""]
    if not edit:
        return lines + ["No editing results: reports/edit/metrics.json is missing (`dvc repro edit`).", ""]
    links = grid_links or {}
    lines += [(f"Zero-shot editing (Song et al. 2023, Algorithm 4) of {edit.get('count', '?')} held-out test images "
              "with the consistency model: PSNR in dB (higher is better) and LPIPS (lower is better) against the "
              "true images, beside a trivial baseline."), ""]
    rows = []
    for task, name in EDIT_TASKS.items():
        v = edit.get(task)
        if not isinstance(v, dict):
            continue
        if task == "super_resolution" and v.get("factor"):
            name += f" ×{v['factor']}"
        if task == "inpainting" and v.get("mask"):
            name += f" ({v['mask']} mask)"
        if v.get("skipped"):
            rows.append({"task": name, "PSNR": f"skipped: {v['skipped']}", "baseline PSNR": "-", "LPIPS": "-",
                         "baseline LPIPS": "-", "baseline": "-", "beats the baseline in": "-"})
            continue
        won = [k.upper() for k, better in (("psnr", v["psnr"] > v["baseline_psnr"]),
                                            ("lpips", v["lpips"] < v["baseline_lpips"])) if better]
        rows.append({"task": name, "PSNR": f"{v['psnr']:.2f}", "baseline PSNR": f"{v['baseline_psnr']:.2f}",
                     "LPIPS": f"{v['lpips']:.3f}", "baseline LPIPS": f"{v['baseline_lpips']:.3f}",
                     "baseline": v.get("baseline", "-"), "beats the baseline in": " and ".join(won) or "neither"})
    if rows:
        lines += [pd.DataFrame(rows).to_markdown(index=False), ""]
    grids_only = [name for task, name in EDIT_GRIDS_ONLY.items() if isinstance(edit.get(task), dict)]
    if grids_only:
        lines += [f"Without a metric (grids only): {', '.join(grids_only)}.", ""]
    if links:
        names = {**EDIT_TASKS, **EDIT_GRIDS_ONLY}
        lines += ["Grids: " + ", ".join(f"[{names.get(t, t)}]({link})" for t, link in links.items()) + ".", ""]
    return lines


def copy_check_markdown(check: dict) -> list[str]:
    """The summary's section on the copy check (stage copy_check): each checked set's median distance
    to its nearest reference, and the consistency model's medians over the teacher's."""
    if not check.get("sets"):
        return []
    refs = {"cached_ends": "nearest cached clean end", "training_images": "nearest training image"}
    rows = [{"set": name, **{f"{label} (median)": v[ref]["median"] if ref in v else None
                             for ref, label in refs.items()}} for name, v in check["sets"].items()]
    lines = ["## Copy check", "", (f"Distance of each sample to its nearest reference image ({check['distance']}): a "
                                   "one-step model that copied what it was trained on would stand much nearer "
                                   "to it than the teacher's own samples do."
                                   + (f" No cache of whole trajectories ({check['no_cache']})." if check.get("no_cache")
                                      else "")), "",
             pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f", missingval="-"), ""]
    ratio = check.get("ratio_to_teacher")
    if ratio:
        lines += ["Consistency model's median over the teacher's (" + ratio["against"] + "): " + ", ".join(
            f"{refs[r]} {v:.3f}" for r, v in ratio.items() if r in refs) + ".", ""]
    return lines


def write_figures(table: pd.DataFrame, training_dirs: dict[str, Path], folder: Path) -> dict[str, Path]:
    """The summary's PNGs in `folder`: "fid_vs_nfe" and one per training stage that logged a loss
    ({stage: its report folder}). Returns {figure: path} of those written; a figure of an earlier
    run that this one does not draw (a stage that no longer trains) is removed."""
    folder = Path(folder)
    made = {"fid_vs_nfe": figures.fid_vs_nfe_figure(table, folder / figures.FID_VS_NFE)}
    for stage, report_dir in training_dirs.items():
        title, unit = TRAINING_STAGES[stage]
        made[stage] = figures.training_figure(report_dir, folder / figures.training_figure_name(stage), title, unit)
    made = {k: p for k, p in made.items() if p is not None}
    if folder.is_dir():
        for old in folder.glob("*.png"):
            if old not in made.values():
                old.unlink()
    return made


def summary_markdown(metrics: dict, sets: dict, grids_dir: Path, root: Path, *, training: dict | None = None,
                     trajectories: dict | None = None, edit: dict | None = None, edit_dir: Path | None = None,
                     copy_check: dict | None = None, figure_paths: dict[str, Path] | None = None) -> str:
    """reports/summary.md. `root` is the folder of the summary (its links are relative to it);
    `training` {stage: `read_training_report`}; `figure_paths` from `write_figures`. An absent
    optional input (training, edit, copy check, figures) leaves out its part or says it is missing."""
    root = Path(root)

    def link(path: Path) -> str:
        return Path(path).relative_to(root).as_posix()

    table = results_table(metrics, sets)
    proto = metrics.get("protocol", {})
    figs = {k: link(p) for k, p in (figure_paths or {}).items()}
    lines = ["# Results", ""] + headline(table, proto) + ["",
             "## Sample sets", "",
             ("Consistency model (cm) against its EDM teacher (Heun, Euler and DPM-Solver++(2M)) on the same initial "
             "noises: the consistency model's steps first, then each teacher sampler by NFE. FID and KID against "
             "the reference statistics of `fid_ref` (protocol below)."), "",
             table_markdown(table), ""]
    if "fid_vs_nfe" in figs:
        lines += [f"![FID against NFE]({figs['fid_vs_nfe']})", ""]
    lines += match_markdown(teacher_nfe_to_match(table))
    lines += protocol_markdown(proto)
    cm1 = table[(table["sampler"] == "cm") & (table["NFE"] == 1)]["FID"].dropna()
    lines += training_markdown(training or {}, trajectories, figs, float(cm1.iloc[0]) if len(cm1) else None)
    grids = {}
    if edit_dir is not None:
        grids = {t: link(Path(edit_dir) / f"{t}.png") for t in (*EDIT_TASKS, *EDIT_GRIDS_ONLY)
                 if (Path(edit_dir) / f"{t}.png").exists()}
    lines += edit_markdown(edit or {}, grids)
    lines += copy_check_markdown(copy_check or {})
    classes = next((info["classes"] for info in sets.values() if info.get("classes")), None)
    lines += [f"## Samples (one row per class, {classes} classes: the first 8 of each)" if classes
              else "## Samples (first 64 of each set)", ""]
    for name in table["set"]:
        png = Path(grids_dir) / f"{name}.png"
        if png.exists():
            lines += [f"### {name}", "", f"![{name}]({link(png)})", ""]
    return "\n".join(lines)
