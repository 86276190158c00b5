"""torchrun and DDP on the CPU (gloo): a DDP step equals a one-process step on the same global
batch, item-parallel work comes back in order, and the launcher builds torchrun's command."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_unet

from cmpipe.cm.losses import edm_loss
from cmpipe.cm.precond import EDMDenoiser
from cmpipe.distributed import ddp as distributed
from cmpipe.distributed.ddp import Dist
from cmpipe.pipeline.launch import command
from cmpipe.pipeline.params import ParamsError
from cmpipe.training.ema import Averages
from cmpipe.training.loop import Checkpoint, EpochSampler, TrainConfig, train

BATCH, STEPS = 8, 3


def test_parts_and_batches():
    assert [Dist(r, 4).part(8) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert Dist().part(8) == slice(0, 8)
    with pytest.raises(ValueError, match="batch of 6 does not split into 4 equal parts"):
        Dist(0, 4).part(6)
    assert list(Dist(1, 3).my_batches(8)) == [1, 4, 7]


def test_launcher_command():
    one = SimpleNamespace(nproc_per_node=1, nnodes=1, rdzv_endpoint="h:1", rdzv_id="x")
    assert command("stages.distill", one) == [sys.executable, "-m", "stages.distill"]
    two = SimpleNamespace(nproc_per_node=2, nnodes=1, rdzv_endpoint="h:1", rdzv_id="x")
    assert command("stages.distill", two)[2:] == ["torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                                                  "--standalone", "-m", "stages.distill"]
    nodes = SimpleNamespace(nproc_per_node=8, nnodes=4, rdzv_endpoint="head:29400", rdzv_id="run7")
    assert "--rdzv_endpoint=head:29400" in command("stages.teacher", nodes)
    with pytest.raises(ParamsError, match="stage module stages.<name>, not 'stages.nope'"):
        command("stages.nope", one)
    with pytest.raises(ParamsError, match="not 'os'"):
        command("os", one)


def _images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(20, 1, 8, 8, generator=g) * 2 - 1


def _train(dist: Dist, resume):
    _, net = tiny_unet(1, seed=0)
    model = EDMDenoiser(net.train(), 0.5)
    images, sampler = _images(), EpochSampler(20, BATCH, 1)
    part = dist.part(BATCH) if dist.enabled else None

    def loss_fn(step, g, target):
        return edm_loss(model, images[sampler.indices(step)], -1.2, 1.2, 0.5, generator=g, part=part)

    cfg = TrainConfig(images=BATCH * STEPS, batch_size=BATCH, lr=1e-3, warmup_images=0, grad_clip=1.0,
                      ema_decays={"ema": 0.9}, checkpoint_every=10**6, log_every=BATCH, seed=5)
    averages = Averages(model, cfg.ema_decays)
    train(model, loss_fn, cfg, averages, Checkpoint(resume, "fp", dist=dist), torch.device("cpu"), dist=dist)
    ema = averages.evaluation["ema"]
    return {k: v.clone() for k, v in model.state_dict().items()}, {k: v.clone() for k, v in ema.state_dict().items()}


def _worker(rank, world, init_file, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model, ema = _train(Dist(rank, world, rank, "gloo"), out.parent / f"resume{rank}.pt")
        if rank == 0:
            torch.save({"model": model, "ema": ema}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_steps_equal_one_process_steps_on_the_global_batch(tmp_path):
    torch.set_num_threads(1)
    one_model, one_ema = _train(distributed.SINGLE, tmp_path / "single.pt")
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    assert set(ddp["model"]) == set(one_model)            # no "module." prefixes leak out
    moved = max((one_model[k] - _train_start()[k]).abs().max().item() for k in one_model)
    assert moved > 1e-4                                    # the steps did change the weights
    # Softmax attention is invariant to a bias on the keys: that bias's exact gradient is 0, its
    # computed one float noise, which Adam's normalisation turns into arbitrary lr-sized steps.
    # (Measured: 1.2e-5 there; every other parameter within 8e-7 after three steps.)
    for k in (k for k in one_model if not k.endswith("to_k.bias")):
        assert torch.allclose(ddp["model"][k], one_model[k], atol=1e-6, rtol=0), k
        assert torch.allclose(ddp["ema"][k], one_ema[k], atol=1e-6, rtol=0), k


def _train_start():
    _, net = tiny_unet(1, seed=0)
    return EDMDenoiser(net, 0.5).state_dict()


def _gather_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        d = Dist(rank, world, rank, "gloo")
        got = list(distributed.gather_in_order(d, 7, lambda b: {"batch": b, "rank": rank}, out_dir / "x", "t"))
        if rank == 0:
            torch.save(got, out_dir / "got.pt")
        else:
            assert got == []
    finally:
        torch.distributed.destroy_process_group()


def test_item_parallel_batches_come_back_in_order_and_leave_nothing_behind(tmp_path):
    mp.spawn(_gather_worker, args=(3, str(tmp_path / "init"), tmp_path), nprocs=3, join=True)
    got = torch.load(tmp_path / "got.pt", weights_only=True)
    assert [g["batch"] for g in got] == list(range(7))
    assert [g["rank"] for g in got] == [b % 3 for b in range(7)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["got.pt", "init"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["got.pt"]   # the parts folder is gone


# --- GPU paths: run where CUDA is present, skipped cleanly elsewhere -------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_accel_training_on_a_gpu_tracks_float32(tmp_path):
    from cmpipe.distributed.accel import Accel

    dev = torch.device("cuda")

    def run(accel):
        _, net = tiny_unet(1, seed=0)
        model = EDMDenoiser(net.to(dev).train(), 0.5)
        images, sampler = _images().to(dev), EpochSampler(20, BATCH, 1)

        def loss_fn(step, g, target):
            return edm_loss(model, images[sampler.indices(step).to(dev)], -1.2, 1.2, 0.5, generator=g)

        cfg = TrainConfig(images=BATCH * STEPS, batch_size=BATCH, lr=1e-3, warmup_images=0, grad_clip=1.0,
                          ema_decays={"ema": 0.9}, checkpoint_every=10**6, log_every=BATCH, seed=5)
        train(model, loss_fn, cfg, Averages(model, cfg.ema_decays), Checkpoint(tmp_path / f"{accel.bf16}.pt", "fp"),
              dev, accel=accel)
        return {k: v.float().cpu() for k, v in model.state_dict().items()}

    plain = run(Accel())
    fast = run(Accel(bf16=True, tf32=True, channels_last=True))
    assert all(torch.isfinite(v).all() for v in fast.values())
    worst = max((fast[k] - plain[k]).abs().max().item() for k in plain)
    assert worst < 5e-3, worst   # three Adam steps of lr 1e-3: bf16 moves weights by far less than a step


def _nccl_worker(rank, world, init_file, out):
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        d = Dist(rank, world, rank, "nccl")
        _, net = tiny_unet(1, seed=0)
        model = EDMDenoiser(net.cuda().train(), 0.5)
        images, sampler = _images().cuda(), EpochSampler(20, BATCH, 1)
        part = d.part(BATCH)

        def loss_fn(step, g, target):
            return edm_loss(model, images[sampler.indices(step).cuda()], -1.2, 1.2, 0.5, generator=g, part=part)

        cfg = TrainConfig(images=BATCH * STEPS, batch_size=BATCH, lr=1e-3, warmup_images=0, grad_clip=1.0,
                          ema_decays={"ema": 0.9}, checkpoint_every=10**6, log_every=BATCH, seed=5)
        train(model, loss_fn, cfg, Averages(model, cfg.ema_decays), Checkpoint(out.parent / f"r{rank}.pt", "fp", dist=d),
              torch.device("cuda", rank), dist=d)
        if rank == 0:
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_nccl_ddp_matches_one_gpu(tmp_path):
    out = tmp_path / "nccl.pt"
    mp.spawn(_nccl_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    one = {k: v for k, v in _train(distributed.SINGLE, tmp_path / "single.pt")[0].items()}
    got = torch.load(out, weights_only=True)
    assert max((got[k] - one[k]).abs().max().item() for k in one if not k.endswith("to_k.bias")) < 1e-4
