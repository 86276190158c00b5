"""The evaluation EMAs of a training stage (teacher, distill): their held-out FID during training
(a curve against training images) and the choice among the stage's `ema_decays`."""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Callable

from cmpipe.training.selection import best_ema, heldout_fids
from cmpipe.errors import ParamsError
from cmpipe.pipeline.layout import EMA_SELECTION_NAME, FID_REF
from cmpipe.training.loop import ema_names
from cmpipe.util.fileio import atomic_write_json, atomic_write_text

SELECTION = EMA_SELECTION_NAME  # in the stage's reports folder
CURVE = "heldout_fid.csv"  # images, ema, decay, fid: drawn by `dvc plots` (template fid_images)
SCORE = "heldout_fid"
log = logging.getLogger(__name__)


def scores_heldout_fid(section) -> bool:
    """Whether the stage scores its EMAs: to choose among several, or for the curve."""
    return len(section.ema_decays) > 1 or section.heldout_fid_every is not None


def check_heldout_fid(section, name: str, ref_path: Path = FID_REF):
    """Before training: scoring the EMAs needs the fid_ref statistics; a decay listed twice is refused."""
    try:
        ema_names(section.ema_decays)
    except ValueError as e:
        raise ParamsError(f"params.yaml: {name}.{e}") from None
    if scores_heldout_fid(section) and not Path(ref_path).is_file():
        why = (f"{name}.ema_decays lists {len(section.ema_decays)} EMAs" if len(section.ema_decays) > 1
               else f"{name}.heldout_fid_every is set")
        raise ParamsError(f"{why}, and their held-out FID needs {ref_path}: run `dvc repro fid_ref` first")


class HeldoutFID:
    """`train(evaluate=...)`: the FID of `section.heldout_fid_count` held-out samples (seed
    `section.heldout_fid_seed`) of every evaluation EMA; `sampler_of(model)` is an EMA's sampler."""

    def __init__(self, section, sampler_of: Callable, shape, device, ref_path: Path = FID_REF):
        self.section, self.sampler_of, self.shape, self.device = section, sampler_of, shape, device
        self.ref_path, self.ref, self.inception = Path(ref_path), None, None

    def __call__(self, images: int, emas: dict) -> dict:
        from cmpipe.metrics import fid as evaluation

        if self.ref is None:  # loaded on the first call, once
            self.ref = evaluation.load_reference(self.ref_path)
            self.inception = evaluation.build_inception(self.device)
        s = self.section
        fids = heldout_fids({n: self.sampler_of(m.eval()) for n, m in emas.items()}, s.heldout_fid_count,
                            s.batch_size, self.shape, s.heldout_fid_seed, self.device, self.ref, self.inception)
        log.info("held-out FID after %d images: %s", images, ", ".join(f"{n} {v:.2f}" for n, v in fids.items()))
        return {SCORE: fids}


def evaluation_ema(section, history: list[dict], report_dir: Path) -> tuple[str, dict]:
    """The name of the EMA that sampling uses, from the last held-out FIDs in the training
    `history` (the lowest), or the only one unscored; writes the record of the choice and the
    curve of every scored EMA to `report_dir`."""
    names = ema_names(section.ema_decays)
    rows = [r for r in history if any(k.startswith(SCORE + "/") for k in r)]
    record = {"decays": dict(names), "fid": {}, "count": 0}
    if rows:
        fids = {n: rows[-1][f"{SCORE}/{n}"] for n in names}
        best = best_ema(fids)
        record.update(fid=fids, images=rows[-1]["images"], count=section.heldout_fid_count,
                      seed=section.heldout_fid_seed)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["images", "ema", "decay", "fid"])
        for r in rows:
            for n, d in names.items():
                w.writerow([r["images"], n, f"{d:g}", f"{r[f'{SCORE}/{n}']:.6g}"])
        atomic_write_text(Path(report_dir) / CURVE, buf.getvalue())
    else:
        best = next(iter(names))
    record.update(chosen=best, chosen_decay=names[best])
    atomic_write_json(Path(report_dir) / SELECTION, record)
    return best, record
