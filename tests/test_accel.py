"""The accel switches executed on the CPU: a few real training steps (training.loop.train on a
tiny UNet) with bf16 autocast on the device's own type, channels-last weights and torch.compile
each actually on, and the stages' policy (`Accel.from_params`): on a CPU the plain path, and the
switches that cannot act named once in the stage's log."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, tiny_unet

from cmpipe.cm.losses import edm_loss
from cmpipe.cm.precond import EDMDenoiser
from cmpipe.distributed.accel import PLAIN, Accel, compile_unavailable
from cmpipe.training.ema import Averages
from cmpipe.training.loop import Checkpoint, EpochSampler, TrainConfig, train

BATCH, STEPS = 8, 3
CPU = torch.device("cpu")
# torch.compile of the tiny UNet (forward and backward, bf16 and channels-last) and 3 steps, measured
# on the shared 2-core machines: 177 s with a cold inductor cache (71 s of CPU time, the machine busy),
# 19-30 s with a warm one (/tmp/torchinductor_<user>). CI starts cold, so `make test` skips it unless
# CMPIPE_COMPILE_BUDGET_S gives it a budget (scripts/gpu_check.sh does); past the budget it is skipped, saying so.
COMPILE_BUDGET_S = float(os.environ.get("CMPIPE_COMPILE_BUDGET_S", "0"))


def run_steps(accel: Accel, path: Path, hook=None) -> dict:
    """STEPS optimizer steps of the EDM loss with `accel`; the logged losses, the model after
    training and the averaged weights."""
    _, net = tiny_unet(1, seed=0)
    model = EDMDenoiser(net.train(), 0.5)
    if hook is not None:
        model.net.conv_in.register_forward_hook(hook)
    images = torch.rand(2 * BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    sampler = EpochSampler(len(images), BATCH, 1)

    def loss_fn(step, g, target):
        return edm_loss(model, images[sampler.indices(step)], -1.2, 1.2, 0.5, generator=g)

    cfg = TrainConfig(images=BATCH * STEPS, batch_size=BATCH, lr=1e-3, warmup_images=0, grad_clip=1.0,
                      ema_decays={"ema": 0.9}, checkpoint_every=BATCH, log_every=BATCH, seed=5)
    averages = Averages(model, cfg.ema_decays)
    history = train(model, loss_fn, cfg, averages, Checkpoint(path, "fp"), CPU, accel=accel)
    return {"losses": [r["loss"] for r in history], "model": model, "ema": averages.evaluation["ema"]}


def assert_trained(out: dict):
    assert len(out["losses"]) == STEPS and all(torch.isfinite(torch.tensor(out["losses"])))
    for which in ("model", "ema"):
        state = out[which].net.state_dict()
        assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}, which
        assert all(torch.isfinite(v).all() for v in state.values()), which


def test_bf16_autocast_runs_on_the_cpu_with_float32_weights(tmp_path):
    seen = []
    out = run_steps(Accel(bf16=True), tmp_path / "r.pt", hook=lambda m, i, o: seen.append(o.dtype))
    assert_trained(out)
    assert seen and set(seen) == {torch.bfloat16}   # the first convolution ran in bf16, every step
    plain = run_steps(PLAIN, tmp_path / "p.pt")
    worst = max((out["model"].net.state_dict()[k] - v).abs().max().item()
                for k, v in plain["model"].net.state_dict().items())
    assert worst < 5e-3, worst   # three Adam steps of lr 1e-3: bf16 moves weights by far less than a step


def test_channels_last_weights_train_on_the_cpu(tmp_path):
    seen = []
    out = run_steps(Accel(channels_last=True), tmp_path / "r.pt",
                    hook=lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    assert_trained(out)
    convs = [p for p in out["model"].net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                         for w in convs)   # every convolution's weight is NHWC (and no longer NCHW)
    assert seen and all(seen)   # the activations follow the weights' NHWC layout


def _compiled_run(out_json: str):
    """In a child process (bounded by COMPILE_BUDGET_S): every switch on, torch.compile included."""
    import tempfile

    from torch._dynamo.utils import counters

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        out = run_steps(Accel(bf16=True, channels_last=True, compile=True), Path(d) / "r.pt")
        resume = torch.load(Path(d) / "r.pt", weights_only=True)["model"]   # the step-2 checkpoint
    assert_trained(out)
    net = out["model"].net
    Path(out_json).write_text(json.dumps({
        "seconds": time.perf_counter() - t0, "losses": out["losses"],
        "graphs": counters["stats"]["unique_graphs"],
        "uncompiled_after": not hasattr(net, "_orig_mod"),
        "checkpoint_keys": sorted(resume) == sorted(out["model"].state_dict()),
        "channels_last": all(p.is_contiguous(memory_format=torch.channels_last) for p in net.parameters()
                             if p.dim() == 4),
        "dtypes": sorted({str(v.dtype) for v in out["ema"].net.state_dict().values()})}))


def test_compile_with_every_switch_on_trains_on_the_cpu(tmp_path):
    why = compile_unavailable(CPU)
    if why:
        pytest.skip(f"torch.compile cannot build on this CPU: {why}")
    if COMPILE_BUDGET_S <= 0:
        pytest.skip("torch.compile of the tiny UNet takes about 3 minutes with a cold inductor cache on a 2-core "
                    "CPU, more than the suite can spare: set CMPIPE_COMPILE_BUDGET_S=600 to run it")
    out = tmp_path / "out.json"
    code = f"import sys; sys.path[:0] = {[str(ROOT / 'tests'), str(ROOT / 'src')]!r}; " \
           f"import test_accel; test_accel._compiled_run({str(out)!r})"
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")  # no worker pool to outlive a timeout
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           check=False, timeout=COMPILE_BUDGET_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"torch.compile did not build and train the tiny UNet within {COMPILE_BUDGET_S:.0f} s on "
                    f"this machine (a cold inductor cache: CMPIPE_COMPILE_BUDGET_S=600 lets it finish)")
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(out.read_text())
    print(f"torch.compile run: {time.perf_counter() - t0:.1f} s in all, {got['seconds']:.1f} s of training")
    assert len(got["losses"]) == STEPS and all(map(math.isfinite, got["losses"])), got
    assert got["graphs"] >= 1, got   # dynamo captured the UNet: the compiled code ran
    assert got["uncompiled_after"] and got["checkpoint_keys"], got   # no _orig_mod. in what is saved
    assert got["channels_last"] and got["dtypes"] == ["torch.float32"], got


def test_from_params_on_a_cpu_is_the_plain_path_and_says_so_once(caplog):
    log = logging.getLogger("stages.teacher")
    every = SimpleNamespace(bf16=True, tf32=True, channels_last=True, compile=True)
    with caplog.at_level(logging.INFO, logger="stages.teacher"):
        assert Accel.from_params(every, CPU, log) == PLAIN
    records = [r for r in caplog.records if "accel." in r.getMessage()]
    assert len(records) == 1 and records[0].name == "stages.teacher"
    assert records[0].getMessage() == (
        "accel.bf16, accel.tf32, accel.channels_last, accel.compile are on but have no effect on cpu "
        "(CUDA only; the CPU path is plain float32); set accel.bf16: false, accel.tf32: false, "
        "accel.channels_last: false, accel.compile: false to silence this")


def test_from_params_names_only_the_switches_that_are_on_and_is_quiet_when_none_is(caplog):
    log = logging.getLogger("stages.distill")
    with caplog.at_level(logging.INFO, logger="stages.distill"):
        Accel.from_params(SimpleNamespace(bf16=True, tf32=False, channels_last=False, compile=False), CPU, log)
        assert caplog.messages == [("accel.bf16 is on but has no effect on cpu (CUDA only; the CPU path is plain "
                                    "float32); set accel.bf16: false to silence this")]
        caplog.clear()
        Accel.from_params(SimpleNamespace(bf16=False, tf32=False, channels_last=False, compile=False), CPU, log)
        Accel.from_params(SimpleNamespace(bf16=True, tf32=True, channels_last=True, compile=False), CPU, log,
                          announce=False)   # the other ranks under torchrun
        assert caplog.messages == []


def test_on_cuda_every_switch_acts_and_compile_without_a_compiler_is_named(caplog, monkeypatch):
    import cmpipe.distributed.accel as accel_mod

    every = SimpleNamespace(bf16=True, tf32=True, channels_last=True, compile=True)
    gpu = torch.device("cuda")   # from_params only reads the device's type: no GPU needed
    log = logging.getLogger("stages.midtrain")
    monkeypatch.setattr(accel_mod, "compile_unavailable", lambda device: None)
    with caplog.at_level(logging.INFO, logger="stages.midtrain"):
        assert Accel.from_params(every, gpu, log) == Accel(True, True, True, True)
        assert caplog.messages == []
        monkeypatch.setattr(accel_mod, "compile_unavailable", lambda device: "Triton is not installed")
        assert Accel.from_params(every, gpu, log) == Accel(True, True, True, False)
    assert caplog.messages == [("accel.compile is on but has no effect on cuda (torch.compile cannot build kernels "
                                "here: Triton is not installed; the UNet runs uncompiled); set accel.compile: false "
                                "to silence this")]
