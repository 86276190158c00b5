"""What each training stage trains and on what, bound to the pipeline's params and artifacts: a
`TrainingSetup` (model, loss, inputs, target rate) that the training-stage skeleton
(pipeline.training_stage) runs. One module per stage: `teacher` (EDM, Karras et al. 2022),
`midtrain` (CMT, Hu et al. 2026) and `distill` (CD and CT, Song et al. 2023; ECT, Geng et al. 2025).
This module holds what they share; the artifacts' paths come from the stage modules' defaults
(pipeline.layout), never from here."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from cmpipe.cm.karras import Sigmas
from cmpipe.cm.precond import ConsistencyFunction, student_from_teacher
from cmpipe.data import ShardError, load_image_split, read_manifest
from cmpipe.errors import ParamsError
from cmpipe.models.networks import build_unet, load_network, num_classes_of
from cmpipe.models.teachers import TEACHER_KINDS

log = logging.getLogger(__name__)


class TrainingSetup(NamedTuple):
    """What the training loop needs from a stage's mode: the model, its loss, its inputs."""
    model: torch.nn.Module  # EDMDenoiser (teacher) or ConsistencyFunction (student)
    unet: dict  # its UNet2DModel config, saved beside its weights
    loss_at: Callable  # (step, generator, target θ⁻ or None) -> the loss of the step's batch
    inputs: list  # hashes of the data the loss reads: part of the resume fingerprint
    target_rate: Callable[[int], float] | None = None  # step -> μ of θ⁻ (CD, CT); None: no target


def train_shard_hashes(manifest: dict) -> list[str]:
    return [s["sha256"] for s in manifest["splits"][manifest["roles"]["train"]]["shards"]]


def student_of_teacher(sig: Sigmas, class_conditional: bool, device, dropout: float, seed: int,
                       teacher_path: Path, wrapper=ConsistencyFunction):
    """A student that starts from a trained network: the EMA UNet of `teacher_path` (a teacher
    file, or a mid-trained consistency model) under the consistency scalings (`wrapper`), with the
    student's own dropout rate (`with_dropout`), and the global RNG that draws its dropout masks
    seeded with `seed`. Returns (student, its UNet config, the class count or None)."""
    net, ckpt = load_network(teacher_path, TEACHER_KINDS + ("consistency",), which="ema")
    teacher_classes = num_classes_of(ckpt["unet"])
    if (teacher_classes is not None) != class_conditional:
        raise ParamsError(
            f"model.class_conditional is {str(class_conditional).lower()} but {teacher_path} is "
            f"{'class-conditional' if teacher_classes else 'unconditional'}: run `dvc repro` (or adopt a "
            f"teacher that matches)")
    net, unet = with_dropout(net, ckpt["unet"], dropout)
    torch.manual_seed(seed)  # the dropout masks (the data and the noise have their own generators)
    return student_from_teacher(net, sig, wrapper).to(device), unet, teacher_classes


def with_dropout(net: torch.nn.Module, unet: dict, p: float) -> tuple[torch.nn.Module, dict]:
    """The teacher's network with the student's own dropout `p` (distill.dropout; the official CD
    runs distil a teacher trained with dropout 0.1 into a student with 0): same weights, and the
    configuration saved with the student says `p`."""
    if float(unet.get("dropout", 0.0)) == float(p):
        return net, unet
    unet = dict(unet, dropout=float(p))
    student_net = build_unet(unet)
    student_net.load_state_dict(net.state_dict())
    return student_net, unet


def train_images_for_teacher(teacher_classes: int | None, manifest_path: Path, teacher_path: Path):
    """The training images and labels that a mode tuning the teacher (online CD, ECT) reads, checked
    against the teacher's class count, and the hashes of their shards (resume fingerprint)."""
    manifest = read_manifest(manifest_path)
    if teacher_classes is not None and teacher_classes != len(manifest["class_names"]):
        raise ShardError(f"the teacher {teacher_path} has {teacher_classes} classes but the shards have "
                         f"{len(manifest['class_names'])}; run `dvc repro teacher`")
    images, labels = load_image_split(manifest_path, role="train")
    return images, labels, train_shard_hashes(manifest)
