"""One training loop for the teacher and the student (nanoGPT-style, nothing hidden).

* The budget is counted in training images, not wall-clock time.
* All randomness of step k comes from a generator seeded with (seed, k), and the
  data order from per-epoch permutations seeded with (seed, epoch): a run resumed
  from a checkpoint takes exactly the steps an uninterrupted run would have.
* Resumable checkpoints are written atomically (temporary file, then rename)
  every `checkpoint_every` images, with the optimizer, the averages (training.ema) and
  the logged history, so a killed run continues where its last checkpoint left off.

The parts: `TrainConfig` (budget, learning rate, when to log, evaluate and checkpoint),
`make_optimizer`, `Checkpoint` (resume), `Curves` (dvclive by optimizer step) and `train`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from cmpipe.distributed.accel import PLAIN, Accel, uncompiled
from cmpipe.distributed.ddp import (
    SINGLE,
    Dist,
    all_reduce_mean,
    barrier,
    plain_state_dict,
    unwrap_ddp,
    wrap_ddp,
)
from cmpipe.training.ema import Averages
from cmpipe.util.fileio import atomic_save
from cmpipe.util.seeding import seeded_generator

log = logging.getLogger(__name__)


class EpochSampler:
    """Indices of batch k: shuffled epochs, repeated as the budget needs, stateless in k."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perm_epoch, self._perm = -1, None

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.n, generator=seeded_generator(self.seed, epoch, 7))
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        start = step * self.batch_size
        out = []
        while len(out) < self.batch_size:
            epoch, pos = divmod(start + len(out), self.n)
            take = min(self.batch_size - len(out), self.n - pos)
            out.extend(self._perm_of(epoch)[pos:pos + take].tolist())
        return torch.tensor(out)


@dataclass
class TrainConfig:
    images: int
    batch_size: int
    lr: float
    warmup_images: int
    grad_clip: float | None
    ema_decays: dict  # name -> decay per step, e.g. {"ema": 0.999}
    checkpoint_every: int
    log_every: int
    seed: int
    name: str = "train"
    optimizer: str = "adam"  # adam | radam (Song et al. 2023 train CD and CT with RAdam)
    eval_every: int | None = None  # images between calls of train(evaluate=...); it is also called at the end
    lr_schedule: str = "constant"  # constant | linear (after the warm-up, down to 0 at the last step, as sony/cmt)

    @property
    def steps(self) -> int:
        return math.ceil(self.images / self.batch_size)

    def lr_at(self, step: int) -> float:
        seen = step * self.batch_size
        if self.warmup_images > 0 and seen < self.warmup_images:
            return self.lr * (seen + self.batch_size) / self.warmup_images
        if self.lr_schedule == "linear":
            warm_steps = math.ceil(self.warmup_images / self.batch_size)
            return self.lr * (self.steps - step) / max(1, self.steps - warm_steps)
        return self.lr

    def _every(self, images: int | None) -> int | None:
        return max(1, images // self.batch_size) if images else None

    def log_now(self, done: int) -> bool:
        """Whether the row of step `done` (1-based) is logged: every log_every images and at the end."""
        return done % self._every(self.log_every) == 0 or done == self.steps

    def eval_now(self, done: int) -> bool:
        """Every eval_every images and after the last step; a periodic evaluation within half a
        period of the end is left to the last one."""
        every = self._every(self.eval_every)
        periodic = bool(every and done % every == 0 and self.steps - done >= every / 2)
        return done == self.steps or periodic

    def checkpoint_now(self, done: int) -> bool:
        return done % self._every(self.checkpoint_every) == 0 and done < self.steps


OPTIMIZERS = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"{cfg.name}.optimizer = {cfg.optimizer!r}: use adam or radam")
    return OPTIMIZERS[cfg.optimizer](model.parameters(), lr=cfg.lr)


def _state_of(module: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in plain_state_dict(module).items()}


class Checkpoint:
    """The resumable state of a run at `path`: model, optimizer, averages and the logged history
    after a step. One made with another `fingerprint` (settings, inputs) or format is ignored and
    removed; one cut short by a kill is ignored with a warning."""

    FORMAT = 2  # 2: the target θ⁻ is saved after its update of the same step (training.ema)

    def __init__(self, path: Path, fingerprint: str, name: str = "train", dist: Dist = SINGLE):
        self.path, self.fingerprint, self.name, self.dist = Path(path), fingerprint, name, dist

    def restore(self, model: nn.Module, opt, averages: Averages) -> tuple[int, list[dict]]:
        """(first step, history so far): (0, []) unless a matching checkpoint was loaded."""
        if not self.path.exists():
            return 0, []
        ckpt = self._read()
        if ckpt is not None and ckpt.get("fingerprint") == self.fingerprint and ckpt.get("format") == self.FORMAT:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            averages.load_state_dict(ckpt["emas"])
            return int(ckpt["step"]), list(json.loads(ckpt["history"]))
        log.info("%s: ignoring %s (made with other settings, inputs or code)", self.name, self.path)
        barrier(self.dist)  # every rank has read it before rank 0 removes it
        if self.dist.is_main:
            self.path.unlink(missing_ok=True)
        return 0, []

    def save(self, step: int, model: nn.Module, opt, averages: Averages, history: list[dict]):
        if self.dist.is_main:
            atomic_save({"step": step, "fingerprint": self.fingerprint, "format": self.FORMAT,
                         "model": _state_of(model), "opt": opt.state_dict(), "emas": averages.state_dict(_state_of),
                         "history": json.dumps(history)}, self.path)

    def remove(self):
        if self.dist.is_main:
            self.path.unlink(missing_ok=True)

    def _read(self):
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a checkpoint cut short by a kill: start over, say so
            log.warning("cannot read the resume checkpoint %s (%s); starting from scratch", self.path, e)
            return None


class Curves:
    """The dvclive curves of a run in `live_dir` (rank 0), indexed by the optimizer step, so that
    the plots' x axis is the step and metrics.json's "step" the last one."""

    def __init__(self, live_dir: Path | None, dist: Dist = SINGLE):
        self.live = None
        if live_dir is not None and dist.is_main:
            from dvclive import Live

            self.live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)

    def log(self, row: dict):
        if self.live is None:
            return
        self.live.step = row["step"]
        for k, v in row.items():
            if k != "step":
                self.live.log_metric(k, v)
        self.live.sync()

    def end(self):
        if self.live is not None:
            self.live.end()


LossFn = Callable[[int, torch.Generator, nn.Module | None], torch.Tensor]  # (step, generator, θ⁻) -> loss
# (images seen, {name: EMA}) -> {score: {name: value}}, e.g. {"heldout_fid": {"ema_0.99": 151.2}}.
EvalFn = Callable[[int, dict], dict]


def train(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig, averages: Averages, checkpoint: Checkpoint,
          device: torch.device, live_dir: Path | None = None, dist: Dist = SINGLE, accel: Accel = PLAIN,
          evaluate: EvalFn | None = None) -> list[dict]:
    """Run `cfg.steps` optimizer steps of `loss_fn(step, generator, averages.target)`, moving
    `averages` after each; return the logged rows (resumed ones included).

    `checkpoint` is resumed when it matches and saved every `cfg.checkpoint_every` images. Under
    torchrun (`dist`), `model.net` is wrapped in DDP for the loop: each rank's `loss_fn` takes its
    part of the global batch (`Dist.part`), DDP averages the gradients, and rank 0 alone writes
    checkpoints and curves. `accel` adds bf16 autocast (on `device`'s own type), channels-last
    and torch.compile (the stages turn them on on CUDA only: `Accel.from_params`). `evaluate`
    (rank 0) scores the evaluation EMAs on `cfg.eval_now` steps; its scores join that step's row
    as "<score>/<name>", under the global RNG state of the step, which it cannot change.
    """
    opt = make_optimizer(model, cfg)
    start, history = checkpoint.restore(model, opt, averages)
    if start:
        log.info("%s: resuming from %s at step %d/%d", cfg.name, checkpoint.path, start, cfg.steps)
    accel.to_layout(model)
    wrap_ddp(model, dist)
    accel.compile_net(model)
    curves = Curves(live_dir, dist)
    for row in history:  # replay what was logged before an interruption
        curves.log(row)

    loss_sum, loss_n, t_last, step_last = torch.zeros((), device=device), 0, time.perf_counter(), start
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=cfg.name,
               unit="step", mininterval=2.0, dynamic_ncols=True, disable=not dist.is_main)
    for step in bar:
        lr = cfg.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        with accel.autocast(device):
            loss = loss_fn(step, seeded_generator(cfg.seed, step), averages.target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        averages.update(model, step)
        loss_sum += loss.detach()
        loss_n += 1

        done = step + 1
        eval_now = evaluate is not None and cfg.eval_now(done)
        if cfg.log_now(done) or eval_now:  # the same on every rank: a logged row is an all-reduce
            mean_loss = all_reduce_mean(dist, loss_sum / loss_n).item()  # the loop's only host sync
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"{cfg.name}: the loss became {mean_loss} before step {done}; lower the "
                    f"learning rate ({cfg.name}.lr) or set {cfg.name}.grad_clip")
            now = time.perf_counter()
            row = {"step": done, "loss": mean_loss, "lr": lr, "images": done * cfg.batch_size,
                   "images_per_sec": (done - step_last) * cfg.batch_size / max(now - t_last, 1e-9)}
            if eval_now and dist.is_main:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    scores = evaluate(done * cfg.batch_size, averages.evaluation)
                row.update({f"{k}/{n}": float(v) for k, group in scores.items() for n, v in group.items()})
                now = time.perf_counter()  # the throughput of the next row leaves the evaluation out
            history.append(row)
            curves.log(row)
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{row['images_per_sec']:.0f}")
            loss_sum.zero_()
            loss_n, t_last, step_last = 0, now, done
        if cfg.checkpoint_now(done):
            checkpoint.save(done, model, opt, averages, history)
    bar.close()
    if hasattr(model, "net"):
        model.net = uncompiled(model.net)
    unwrap_ddp(model)
    curves.end()
    return history


