"""The summary's PNG figures (matplotlib): FID against NFE, and each training stage's curves.

Drawn on a bare `Figure` with the Agg canvas (no pyplot: no global state, no display needed), in
matplotlib's default style whatever a user's matplotlibrc says, at a fixed dpi and without the
PNG's "Software" text, so that the same numbers give the same bytes. The `dvc plots` definitions of
dvc.yaml stay: these are the pictures a reader of reports/summary.md sees without DVC.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.style
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter, NullLocator, ScalarFormatter

from cmpipe.sampling.kinds import SAMPLER_NAMES, TEACHER_KINDS
from cmpipe.util.fileio import atomic_path

DPI = 120
PNG_METADATA = {"Software": None}  # the only text matplotlib puts in a PNG: its version
FID_VS_NFE = "fid_vs_nfe.png"


def training_figure_name(stage: str) -> str:
    return f"training_{stage}.png"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:  # a kill never leaves half a PNG
        fig.savefig(tmp, format="png", dpi=DPI, metadata=PNG_METADATA)
    return Path(path)


def _nfe_axis(ax, nfes):
    """A log NFE axis labelled at the evaluated NFE, as plain numbers (not 10^0, 10^1)."""
    ax.set_xscale("log")
    ticks = sorted({int(n) for n in nfes})
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(min(ticks) / 1.25, max(ticks) * 1.25)


def fid_vs_nfe_figure(table: pd.DataFrame, path: Path) -> Path | None:
    """FID against NFE (log axis): one line per teacher sampler, the consistency model's step counts as
    stars. `table` has columns sampler (the kind), NFE and FID (`report.results_table`). None, and
    nothing written, when no set has a FID."""
    rows = table.dropna(subset=["FID"])
    if rows.empty:
        return None
    with matplotlib.style.context("default"):
        fig = _figure(6.4, 4.2)
        ax = fig.add_subplot()
        for kind in TEACHER_KINDS:
            t = rows[rows["sampler"] == kind].sort_values("NFE")
            if not t.empty:
                ax.plot(t["NFE"], t["FID"], marker="o", label=f"teacher, {SAMPLER_NAMES[kind]}")
        cm = rows[rows["sampler"] == "cm"].sort_values("NFE")
        if not cm.empty:
            ax.plot(cm["NFE"], cm["FID"], linestyle="none", marker="*", markersize=15, color="black",
                    label="consistency model")
            for f in cm["FID"]:  # a faint level per step count: where a teacher curve crosses it, it matches
                ax.axhline(f, color="black", linestyle=":", linewidth=0.8, alpha=0.4)
            for n, f in zip(cm["NFE"], cm["FID"]):  # below each star: neighbouring steps sit side by side
                ax.annotate(f"{int(n)} step{'s' * (n > 1)}", (n, f), textcoords="offset points", xytext=(0, -18),
                            ha="center", fontsize=9)
            low, high = ax.get_ylim()
            ax.set_ylim(low - 0.06 * (high - low), high)  # room for the lowest label
        _nfe_axis(ax, rows["NFE"])
        ax.set_xlabel("NFE (network evaluations per image, log scale)")
        ax.set_ylabel("FID (lower is better)")
        ax.set_title("FID against NFE")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9)
        return _save(fig, path)


def _loss_curve(report_dir: Path) -> pd.DataFrame | None:
    """dvclive's loss by optimizer step, joined with its images seen by step: columns images, loss."""
    metrics = Path(report_dir) / "plots" / "metrics"
    if not (metrics / "loss.tsv").is_file() or not (metrics / "images.tsv").is_file():
        return None
    loss = pd.read_csv(metrics / "loss.tsv", sep="\t")
    images = pd.read_csv(metrics / "images.tsv", sep="\t")
    curve = loss.merge(images, on="step").sort_values("step")
    return curve if not curve.empty else None


def training_figure(report_dir: Path, path: Path, title: str, unit: str = "training images") -> Path | None:
    """A training stage's loss (left) and held-out FID of each evaluation EMA (right) against the
    `unit` seen, from the dvclive curves and heldout_fid.csv its report folder holds. None, and
    nothing written, when the stage logged no loss (it trained nothing)."""
    loss = _loss_curve(report_dir)
    if loss is None:
        return None
    heldout_csv = Path(report_dir) / "heldout_fid.csv"
    heldout = pd.read_csv(heldout_csv) if heldout_csv.is_file() else None
    with matplotlib.style.context("default"):
        fig = _figure(9.6, 3.6)
        left, right = fig.subplots(1, 2)
        left.plot(loss["images"], loss["loss"])
        left.set_yscale("log")  # the loss falls by orders of magnitude early on
        left.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        left.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # 0.3, 0.5, 1 rather than 3×10^-1
        left.yaxis.set_minor_formatter(NullFormatter())
        left.set_ylabel("training loss (log scale)")
        left.set_title("loss")
        if heldout is not None and not heldout.empty:
            for ema, curve in heldout.groupby("ema", sort=True):
                curve = curve.sort_values("images")
                right.plot(curve["images"], curve["fid"], marker="o",
                           label=f"{ema} (decay {curve['decay'].iloc[0]:g})")
            right.legend(fontsize=9)
            right.set_ylabel("held-out FID (lower is better)")
        else:
            right.text(0.5, 0.5, "no held-out FID recorded", ha="center", va="center", transform=right.transAxes)
            right.set_yticks([])
        right.set_title("held-out FID of each evaluation EMA")
        for ax in (left, right):
            ax.set_xlabel(unit + " seen")
            ax.set_xlim(0, float(loss["images"].max()) * 1.02)
            ax.grid(True, alpha=0.3)
        fig.suptitle(title)
        return _save(fig, path)
