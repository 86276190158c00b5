"""One training loop for the teacher and the student (nanoGPT-style, nothing hidden).

* The budget is counted in training images, not wall-clock time.
* All randomness of step k comes from a generator seeded with (seed, k), and the
  data order from per-epoch permutations seeded with (seed, epoch): a run resumed
  from a checkpoint takes exactly the steps an uninterrupted run would have.
* Resumable checkpoints are written atomically (temporary file, then rename)
  every `checkpoint_every` images, with the optimizer, the EMAs and the logged
  history, so a killed run continues where its last checkpoint left off.
"""
from __future__ import annotations

import copy
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


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float):
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def ema_name(decay: float) -> str:
    """The weights' name of the EMA with `decay` in a saved model, e.g. 'ema_0.999'."""
    return f"ema_{decay:g}"


def ema_names(decays: list[float]) -> dict[str, float]:
    """{name: decay} of the training loop's EMAs; one decay keeps the plain name 'ema'."""
    if len(decays) == 1:
        return {"ema": float(decays[0])}
    names = {ema_name(d): float(d) for d in decays}
    if len(names) != len(decays):
        raise ValueError(f"ema_decays = {decays} lists a decay twice (names are 'ema_<decay>' with 6 "
                         f"significant digits)")
    return names


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

    @property
    def steps(self) -> int:
        return math.ceil(self.images / self.batch_size)

    def lr_at(self, step: int) -> float:
        seen = step * self.batch_size
        if self.warmup_images > 0 and seen < self.warmup_images:
            return self.lr * (seen + self.batch_size) / self.warmup_images
        return self.lr


def _state_of(module: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in plain_state_dict(module).items()}


LossFn = Callable[[int, torch.Generator, dict], torch.Tensor]
# (images seen, {name: EMA}) -> {score: {name: value}}, e.g. {"heldout_fid": {"ema_0.99": 151.2}}.
EvalFn = Callable[[int, dict], dict]


def train(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig, resume_path: Path,
          live_dir: Path | None, fingerprint: str, device: torch.device,
          emas: dict | None = None, dist: Dist = SINGLE, accel: Accel = PLAIN,
          evaluate: EvalFn | None = None, history_out: list | None = None) -> dict:
    """Run `cfg.steps` optimizer steps of `loss_fn(step, generator, emas)`.

    `emas` maps a name to an EMA copy of `model` (created from `model` when
    missing) updated after every step with `cfg.ema_decays[name]`. Returns the
    EMAs. A checkpoint at `resume_path` with the same `fingerprint` is resumed.
    Under torchrun (`dist`), `model.net` is wrapped in DDP for the loop: each
    rank's `loss_fn` takes its part of the global batch (`Dist.part`), DDP
    averages the gradients, and rank 0 alone writes checkpoints and logs.
    `accel` (CUDA only) adds bf16 autocast, channels-last and torch.compile.
    `evaluate` (rank 0 only) scores the evaluation EMAs (those of `cfg.ema_decays`) every
    `cfg.eval_every` images and after the last step; its scores join that step's logged row as
    "<score>/<name>" (dvclive curves), under the global RNG state of the step, which it cannot
    change. `history_out`, if given, receives every logged row (resumed ones included).
    """
    emas = dict(emas or {})
    for name in cfg.ema_decays:
        if name not in emas:
            emas[name] = copy.deepcopy(model).requires_grad_(False)
    optimizers = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}
    if cfg.optimizer not in optimizers:
        raise ValueError(f"{cfg.name}.optimizer = {cfg.optimizer!r}: use adam or radam")
    opt = optimizers[cfg.optimizer](model.parameters(), lr=cfg.lr)
    start, history = 0, []

    resume_path = Path(resume_path)
    if resume_path.exists():
        ckpt = _load_resume(resume_path)
        if ckpt is not None and ckpt.get("fingerprint") == fingerprint:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            for name, sd in ckpt["emas"].items():
                emas[name].load_state_dict(sd)
            start, history = int(ckpt["step"]), list(json.loads(ckpt["history"]))
            log.info("%s: resuming from %s at step %d/%d", cfg.name, resume_path, start, cfg.steps)
        else:
            log.info("%s: ignoring %s (made with other settings or inputs)", cfg.name, resume_path)
            barrier(dist)  # every rank has read it before rank 0 removes it
            if dist.is_main:
                resume_path.unlink(missing_ok=True)
    accel.to_layout(model)
    wrap_ddp(model, dist)
    accel.compile_net(model)

    live = None
    if live_dir is not None and dist.is_main:
        from dvclive import Live

        live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)
        for row in history:  # replay what was logged before an interruption
            for k, v in row.items():
                if k != "step":
                    live.log_metric(k, v)
            live.next_step()

    steps_per_ckpt = max(1, cfg.checkpoint_every // cfg.batch_size)
    steps_per_log = max(1, cfg.log_every // cfg.batch_size)
    steps_per_eval = max(1, cfg.eval_every // cfg.batch_size) if cfg.eval_every else None
    loss_sum, loss_n, t_last, step_last = torch.zeros((), device=device), 0, time.perf_counter(), start
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=cfg.name,
               unit="step", mininterval=2.0, dynamic_ncols=True, disable=not dist.is_main)
    for step in bar:
        lr = cfg.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        g = seeded_generator(cfg.seed, step)
        with accel.autocast():
            loss = loss_fn(step, g, emas)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        for name, decay in cfg.ema_decays.items():
            ema_update(emas[name], model, decay)
        loss_sum += loss.detach()
        loss_n += 1

        done = step + 1
        # The same on every rank: a logged row is an all-reduce.
        # A periodic evaluation within half a period of the last step is left to the last one.
        periodic = bool(steps_per_eval and done % steps_per_eval == 0 and cfg.steps - done >= steps_per_eval / 2)
        eval_now = evaluate is not None and (done == cfg.steps or periodic)
        if done % steps_per_log == 0 or done == cfg.steps or eval_now:
            # The only host synchronisation of the loop: at logging intervals.
            mean_loss = all_reduce_mean(dist, loss_sum / loss_n).item()
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"{cfg.name}: the loss became {mean_loss} before step {done}; lower the "
                    f"learning rate ({cfg.name}.lr) or set {cfg.name}.grad_clip")
            now = time.perf_counter()
            row = {"step": done, "loss": mean_loss, "lr": lr, "images": done * cfg.batch_size,
                   "images_per_sec": (done - step_last) * cfg.batch_size / max(now - t_last, 1e-9)}
            if eval_now and dist.is_main:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    scores = evaluate(done * cfg.batch_size, {n: emas[n] for n in cfg.ema_decays})
                row.update({f"{k}/{n}": float(v) for k, group in scores.items() for n, v in group.items()})
                now = time.perf_counter()  # the throughput of the next row leaves the evaluation out
            history.append(row)
            if live is not None:
                for k, v in row.items():
                    if k != "step":
                        live.log_metric(k, v)
                live.next_step()
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{row['images_per_sec']:.0f}")
            loss_sum.zero_()
            loss_n, t_last, step_last = 0, now, done
        if done % steps_per_ckpt == 0 and done < cfg.steps and dist.is_main:
            atomic_save({"step": done, "fingerprint": fingerprint, "model": _state_of(model),
                         "opt": opt.state_dict(), "emas": {k: _state_of(m) for k, m in emas.items()},
                         "history": json.dumps(history)}, resume_path)
    bar.close()
    if hasattr(model, "net"):
        model.net = uncompiled(model.net)
    unwrap_ddp(model)
    if live is not None:
        live.end()
    if history_out is not None:
        history_out.extend(history)
    return emas


def _load_resume(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a checkpoint cut short by a kill: start over, say so
        log.warning("cannot read the resume checkpoint %s (%s); starting from scratch", path, e)
        return None


