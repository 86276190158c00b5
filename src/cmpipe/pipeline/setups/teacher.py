"""The teacher stage's setup: an EDM denoiser trained from random weights on the training images."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from cmpipe.cm.karras import Sigmas
from cmpipe.cm.losses import edm_loss
from cmpipe.cm.precond import EDMDenoiser
from cmpipe.data import load_image_split, read_manifest
from cmpipe.distributed.accel import resident
from cmpipe.models.networks import build_unet, count_parameters, model_num_classes, unet_config
from cmpipe.pipeline.layout import MANIFEST
from cmpipe.pipeline.setups import TrainingSetup, train_shard_hashes
from cmpipe.training.loop import EpochSampler
from cmpipe.util.images import to_unit

log = logging.getLogger(__name__)


def teacher_setup(t, model_params, sig: Sigmas, device, part: slice | None = None,
                  manifest_path: Path = MANIFEST) -> TrainingSetup:
    """The EDM teacher from random weights (the architecture of params `model`, seeded by
    teacher.seed) on the training images, with the EDM loss (P_mean, P_std of `teacher`).
    Under torchrun, `part` is this rank's rows of the global batch."""
    manifest = read_manifest(manifest_path)
    c, h, _ = manifest["shape"]
    num_classes = model_num_classes(model_params.class_conditional, manifest["class_names"])
    unet = unet_config(model_params.block_out_channels, model_params.layers_per_block,
                       model_params.attention_levels, model_params.dropout, h, c, num_classes)
    torch.manual_seed(t.seed)  # the initial weights
    net = build_unet(unet).to(device)
    log.info("UNet2DModel with %.2fM parameters on %s%s", count_parameters(net) / 1e6, device,
             f", conditioned on {num_classes} classes" if num_classes else "")
    images, labels = load_image_split(manifest_path, role="train")
    images, labels = resident(images, device), resident(labels, device)
    sampler = EpochSampler(len(images), t.batch_size, t.seed)
    model = EDMDenoiser(net, sig.sigma_data)

    def loss_at(step, g, target):  # no target: the teacher regresses the data
        i = sampler.indices(step)  # the global batch; under torchrun this rank keeps `part`
        x = to_unit(images[i.to(images.device)]).to(device, non_blocking=True)
        y = labels[(i if part is None else i[part]).to(labels.device)].to(device) if num_classes else None
        return edm_loss(model.with_labels(y), x, t.P_mean, t.P_std, sig.sigma_data, generator=g, part=part)

    return TrainingSetup(model, unet, loss_at, train_shard_hashes(manifest))
