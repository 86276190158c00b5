"""The markdown summary of a run: one table of quality against NFE and time, and the grids."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from cmpipe.sampling.kinds import SAMPLER_NAMES, TEACHER_KINDS


def results_table(metrics: dict, sets: dict) -> pd.DataFrame:
    rows = []
    for name, info in sets.items():
        made_by = info.get("model") or {}
        model = " ".join(made_by.get(k, "") for k in ("mode", "metric")).strip()
        if made_by.get("weighting", "uniform") != "uniform":
            model += f" ({made_by['weighting']} weighting)"
        if made_by.get("init") == "midtrain":  # post-trained from the mid-trained model
            model = f"midtrain → {model}"
        rows.append({"set": name, "sampler": info["kind"], "model": model or "teacher", "NFE": info["nfe"],
                     "ts": " ".join(map(str, info.get("ts", []))) + (" (searched)" if info.get("ts_searched") else ""),
                     "FID": metrics.get("fid", {}).get(name), "KID": metrics.get("kid", {}).get(name),
                     "s/image": info.get("seconds_per_image"), "images": info.get("count")})
    return pd.DataFrame(rows).sort_values(["sampler", "NFE"]).reset_index(drop=True)


# The teacher's samplers, in the order of the summary, and their names there.
TEACHER_SAMPLERS = {kind: SAMPLER_NAMES[kind] for kind in TEACHER_KINDS}


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
            t = rows[rows["sampler"] == sampler].sort_values("NFE")
            if t.empty:
                continue
            nfe, fid = [int(n) for n in t["NFE"]], [float(f) for f in t["FID"]]
            hit = next((i for i, f in enumerate(fid) if f <= cm["FID"]), None)
            interpolated = None
            if hit:  # the NFE before the first match has a FID above the cm's: they bracket it
                (n0, n1), (f0, f1) = nfe[hit - 1:hit + 1], fid[hit - 1:hit + 1]
                w = (f0 - cm["FID"]) / (f0 - f1)
                interpolated = math.exp((1 - w) * math.log(n0) + w * math.log(n1))
            best = min(range(len(fid)), key=fid.__getitem__)
            out.append({"cm_set": cm["set"], "cm_nfe": int(cm["NFE"]), "cm_fid": float(cm["FID"]),
                        "sampler": sampler, "nfe": None if hit is None else nfe[hit],
                        "bracket": None if not hit else (nfe[hit - 1], nfe[hit]),
                        "interpolated_nfe": interpolated, "best_fid": fid[best], "best_nfe": nfe[best]})
    return out


def match_markdown(matches: list[dict]) -> list[str]:
    """The lines of the summary's section on `teacher_nfe_to_match`."""
    if not matches:
        return []
    rows = [{"consistency model": f"{m['cm_nfe']} step{'s' * (m['cm_nfe'] > 1)} (FID {m['cm_fid']:.4g})",
             "teacher sampler": TEACHER_SAMPLERS[m["sampler"]],
             "smallest NFE with FID at most the cm's": m["nfe"] if m["nfe"] is not None else
             f"none of the evaluated NFE (best: {m['best_fid']:.4g} at NFE {m['best_nfe']})",
             "interpolated (log NFE)": f"{m['interpolated_nfe']:.3g} (between NFE {m['bracket'][0]} and "
                                       f"{m['bracket'][1]})" if m["bracket"] else "-"}
            for m in matches]
    return ["## Teacher NFE to match the consistency model", "",
            ("The smallest evaluated teacher NFE whose FID is at most the consistency model's, and the NFE "
             "where the teacher's FID crosses it, interpolated linearly in log NFE between the bracketing "
             "evaluated NFE."), "", pd.DataFrame(rows).to_markdown(index=False), ""]


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


def flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested JSON (dvclive's "heldout_fid/ema_0.99") as one line."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def summary_markdown(metrics: dict, sets: dict, extras: dict, grids_dir: Path, root: Path,
                     copy_check: dict | None = None) -> str:
    table = results_table(metrics, sets)
    proto = metrics.get("protocol", {})
    lines = ["# Results", "",
             "Consistency model (cm) against its EDM teacher (Heun, Euler and DPM-Solver++(2M)) on the same initial "
             "noises. FID and KID (clean-fid, mode clean) against the reference statistics of "
             f"`fid_ref`; protocol: `{json.dumps(proto, sort_keys=True)}`. FID of small sample sets "
             "is biased upward: compare sets of equal size only.", "",
             table.to_markdown(index=False, floatfmt=".4g"), ""]
    lines += match_markdown(teacher_nfe_to_match(table))
    lines += copy_check_markdown(copy_check or {})
    for title, d in extras.items():
        if d:
            lines += [f"**{title}**: " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                                                   for k, v in sorted(flat(d).items())), ""]
    classes = next((info["classes"] for info in sets.values() if info.get("classes")), None)
    lines += [f"## Samples (one row per class, {classes} classes: the first 8 of each)" if classes
              else "## Samples (first 64 of each set)", ""]
    for name in table["set"]:
        png = grids_dir / f"{name}.png"
        if png.exists():
            lines += [f"### {name}", "", f"![{name}]({png.relative_to(root).as_posix()})", ""]
    return "\n".join(lines)
