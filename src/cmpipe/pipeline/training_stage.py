"""The skeleton of a training stage (teacher, midtrain, distill): what every one of them does around its own
setup (pipeline.setups), so that a stage is its params, its setup and its meta.

Before any work, `check` refuses what would fail late (a decay listed twice, held-out scoring
without the fid_ref statistics) and clears the stage's report folder. `train` runs the loop
(training.loop) with the evaluation EMAs and, where the setup has one, the target θ⁻
(training.ema), scores the EMAs on held-out samples, chooses the one sampling uses, saves the
model file and removes the resume checkpoint. `preview` draws the chosen model's sample grid.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from cmpipe.cm.precond import ConsistencyFunction
from cmpipe.errors import ParamsError
from cmpipe.models.networks import load_network, read_model_file, save_model
from cmpipe.pipeline.config import train_config_from
from cmpipe.pipeline.layout import FID_REF, TRAINING_TIME_NAME
from cmpipe.pipeline.setups import TrainingSetup
from cmpipe.sampling.sets import class_labels, generate, preview_plan
from cmpipe.training.ema import TARGET, Averages, ema_names
from cmpipe.training.loop import Checkpoint, train
from cmpipe.training.selection import HeldoutFID, choose_ema
from cmpipe.util.fileio import atomic_write_json
from cmpipe.util.hashing import fingerprint_of
from cmpipe.util.images import save_grid

log = logging.getLogger(__name__)


def scores_heldout_fid(section) -> bool:
    """Whether the stage scores its EMAs: to choose among several, or for the curve."""
    return len(section.ema_decays) > 1 or section.heldout_fid_every is not None


class TrainingStage:
    """A training stage named `name` with params `section` (the training keys: images, batch_size,
    lr, ema_decays, heldout_fid_*...), writing the model file `out` and the report folder
    `report`, resumable from `resume`."""

    def __init__(self, name: str, section, out: Path, report: Path, resume: Path, dist, ref_path: Path = FID_REF):
        self.name, self.section, self.dist = name, section, dist
        self.out, self.report, self.resume, self.ref_path = Path(out), Path(report), Path(resume), Path(ref_path)

    def check(self, trains: bool = True):
        """Before any work: the EMA names, and the fid_ref statistics that held-out scoring needs;
        then the report folder of an earlier run goes."""
        s = self.section
        if trains:
            try:
                ema_names(s.ema_decays)
            except ValueError as e:
                raise ParamsError(f"params.yaml: {self.name}.{e}") from None
            if scores_heldout_fid(s) and not self.ref_path.is_file():
                why = (f"{self.name}.ema_decays lists {len(s.ema_decays)} EMAs" if len(s.ema_decays) > 1
                       else f"{self.name}.heldout_fid_every is set")
                raise ParamsError(f"{why}, and their held-out FID needs {self.ref_path}: run "
                                  f"`dvc repro fid_ref` first")
        if self.report.exists() and self.dist.is_main:
            shutil.rmtree(self.report)

    def train(self, setup: TrainingSetup, kind: str, meta: dict, heldout_sampler: Callable, shape, device,
              accel, fingerprint: list):
        """Train `setup.model`; on rank 0 save it as a `kind` model file with `meta` and return the
        chosen evaluation EMA (None on other ranks). `heldout_sampler(model, labels)` draws the
        held-out samples of an EMA; `fingerprint` (the params read) joins the setup's inputs in the
        resume checkpoint's fingerprint."""
        s, dist = self.section, self.dist
        cfg = train_config_from(s, self.name)
        averages = Averages(setup.model, cfg.ema_decays, setup.target_rate)
        scorer = None
        if scores_heldout_fid(s):
            labels = class_labels(setup.model.num_classes, s.heldout_fid_seed)
            scorer = HeldoutFID(lambda m: heldout_sampler(m, labels), s.heldout_fid_count, s.heldout_fid_seed,
                                s.batch_size, shape, device, self.ref_path)
        checkpoint = Checkpoint(self.resume, fingerprint_of(*fingerprint, setup.inputs), self.name, dist)
        start = time.perf_counter()
        history = train(setup.model, setup.loss_at, cfg, averages, checkpoint, device, self.report, dist, accel,
                        scorer)
        seconds = time.perf_counter() - start
        if not dist.is_main:  # rank 0 alone chooses the EMA and writes the model
            return None
        # The summary's wall time (dvclive's rows hold throughput only, which leaves the held-out FIDs out).
        atomic_write_json(self.report / TRAINING_TIME_NAME, {
            "seconds": round(seconds, 1),
            "covers": "the training loop with its held-out FIDs, in this process (after a resume: since the resume)"})
        best, choice = choose_ema(cfg.ema_decays, history, self.report, s.heldout_fid_count, s.heldout_fid_seed)
        weights = {"ema": averages.evaluation[best].net.state_dict()}
        if kind == "consistency":  # θ⁻; a student that is its own target (ECT) saves itself
            weights[TARGET] = (averages.target or setup.model).net.state_dict()
        weights["model"] = setup.model.net.state_dict()
        weights.update({n: m.net.state_dict() for n, m in averages.evaluation.items() if n != "ema"})
        save_model(self.out, kind, setup.unet, weights, dict(meta, ema_decay=choice["chosen_decay"]))
        checkpoint.remove()
        return averages.evaluation[best]

    def preview(self, sampler_of: Callable, model, shape, seed: int, device, desc: str) -> float:
        """The preview grid of `model` (`sampler_of(model, labels)`) in the report folder: 64
        samples, or one row per class, from a fixed seed so that grids compare across runs.
        Returns the seconds per image."""
        model.eval()
        count, labels = preview_plan(getattr(model, "num_classes", None))
        images, spi = generate(sampler_of(model, labels), count, 64, shape, seed, device, desc)
        self.report.mkdir(parents=True, exist_ok=True)
        save_grid(images, self.report / "samples.png", nrow=8)
        log.info("wrote %s and %s", self.out, self.report / "samples.png")
        return spi

    def write_unused(self, why: str):
        """The outputs of a stage that nobody downstream reads (e.g. midtrain with distill.init
        teacher): a note saying why, in the model's folder and the report folder."""
        log.info("%s not run: %s, which does not read it", self.name, why)
        if self.dist.is_main:
            for folder in (self.out.parent, self.report):
                atomic_write_json(folder / "unused.json", {"unused": why})

    def adopt(self, path: Path, sigma_data: float, sigma_min: float, device) -> ConsistencyFunction:
        """Train nothing: the consistency model at `path` becomes this stage's model file (with
        `adopted_from` in its meta) and its chosen EMA is returned."""
        ckpt = read_model_file(path, ("consistency",))
        save_model(self.out, "consistency", ckpt["unet"], ckpt["weights"], dict(ckpt["meta"], adopted_from=str(path)))
        atomic_write_json(self.report / "ema_selection.json", {"adopted_from": str(path), "chosen": "ema"})
        log.info("%s trains nothing: %s is its model", self.name, path)
        net, _ = load_network(self.out, ("consistency",), which="ema")
        return ConsistencyFunction(net, sigma_data, sigma_min).to(device)
