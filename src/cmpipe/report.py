"""The markdown summary of a run: one table of quality against NFE and time, and the grids."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def results_table(metrics: dict, sets: dict) -> pd.DataFrame:
    rows = []
    for name, info in sets.items():
        made_by = info.get("model") or {}
        model = " ".join(made_by.get(k, "") for k in ("mode", "metric")).strip()
        if made_by.get("weighting", "uniform") != "uniform":
            model += f" ({made_by['weighting']} weighting)"
        rows.append({"set": name, "sampler": info["kind"], "model": model or "teacher", "NFE": info["nfe"],
                     "ts": " ".join(map(str, info.get("ts", []))) + (" (searched)" if info.get("ts_searched") else ""),
                     "FID": metrics.get("fid", {}).get(name), "KID": metrics.get("kid", {}).get(name),
                     "s/image": info.get("seconds_per_image"), "images": info.get("count")})
    return pd.DataFrame(rows).sort_values(["sampler", "NFE"]).reset_index(drop=True)


def summary_markdown(metrics: dict, sets: dict, extras: dict, grids_dir: Path, root: Path) -> str:
    table = results_table(metrics, sets)
    proto = metrics.get("protocol", {})
    lines = ["# Results", "",
             "Consistency model (cm) against its EDM teacher (Heun and Euler) on the same initial "
             "noises. FID and KID (clean-fid, mode clean) against the reference statistics of "
             f"`fid_ref`; protocol: `{json.dumps(proto, sort_keys=True)}`. FID of small sample sets "
             "is biased upward: compare sets of equal size only.", "",
             table.to_markdown(index=False, floatfmt=".4g"), ""]
    for title, d in extras.items():
        if d:
            lines += [f"**{title}**: " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                                                   for k, v in sorted(d.items())), ""]
    classes = next((info["classes"] for info in sets.values() if info.get("classes")), None)
    lines += [f"## Samples (one row per class, {classes} classes: the first 8 of each)" if classes
              else "## Samples (first 64 of each set)", ""]
    for name in table["set"]:
        png = grids_dir / f"{name}.png"
        if png.exists():
            lines += [f"### {name}", "", f"![{name}]({png.relative_to(root).as_posix()})", ""]
    return "\n".join(lines)
