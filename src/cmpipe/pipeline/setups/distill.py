"""The distill stage's setups: CD from the trajectory cache or online (Song et al. 2023, Algorithm 2),
CT from the training images (Algorithm 3), and ECT (Geng et al. 2025) from the training images; the
student starts from `distill.init` (the teacher, or the mid-trained model)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from cmpipe.cm.karras import Sigmas
from cmpipe.cm.losses import cd_loss, cd_loss_online, ct_loss, ect_loss
from cmpipe.cm.precond import ConsistencyFunction, ECTConsistencyFunction
from cmpipe.cm.schedules import CTSchedule, ect_r, ect_sample_t, sample_pair_indices
from cmpipe.data import ShardError, load_image_split, read_manifest
from cmpipe.distributed.accel import resident
from cmpipe.errors import ParamsError
from cmpipe.models.networks import build_unet, count_parameters, model_num_classes, unet_config
from cmpipe.models.teachers import load_teacher
from cmpipe.pipeline.config import ct_schedule_from, resolve_metric
from cmpipe.pipeline.layout import MANIFEST, MIDTRAIN, TEACHER, TRAJECTORIES
from cmpipe.pipeline.setups import TrainingSetup, student_of_teacher, train_images_for_teacher, train_shard_hashes
from cmpipe.pipeline.trajectory_cache import read_cache
from cmpipe.training.loop import EpochSampler
from cmpipe.training.trajectories import load_pairs
from cmpipe.util.hashing import sha256_file
from cmpipe.util.images import to_unit

log = logging.getLogger(__name__)


def check_distill(d):
    """Combinations of `distill` keys that cannot mean anything, refused before any work."""
    if d.mode == "cd" and d.mu_schedule in ("ct", "ct_paper"):
        raise ParamsError(f"distill.mu_schedule = {d.mu_schedule} follows the N(k) of consistency training; "
                          "with distill.mode = cd use mu_schedule: fixed (rate distill.mu)")
    if d.images == 0 and d.init != "midtrain":
        raise ParamsError("distill.images = 0 trains nothing, which only means something with distill.init = midtrain "
                          "(the mid-trained model is then the consistency model): set a budget or distill.init")
    try:
        ct_schedule_from(d, 1)
    except ValueError as e:
        raise ParamsError(f"params.yaml: {e}") from None


def distill_distance(d) -> tuple[str, str]:
    """(distance, weighting) of the distill loss, as the model file and the reports name them."""
    if d.mode == "ect":
        return f"pseudo_huber(c={d.ect_huber_c:g})", "1/(t-r)"
    return d.metric, d.weighting


def distill_init(d, midtrain_path: Path = MIDTRAIN) -> Path | None:
    """The file the student starts from when not the mode's own start (the teacher for cd and ect,
    random weights for ct): the mid-trained model with distill.init = midtrain."""
    if d.init != "midtrain":
        return None
    if not Path(midtrain_path).is_file():
        raise ParamsError(f"distill.init = midtrain but {midtrain_path} does not exist: run `dvc repro midtrain`")
    return Path(midtrain_path)


def distill_setup(d, sig: Sigmas, model_params, steps: int, device, part: slice | None = None) -> TrainingSetup:
    """The student of `distill.mode` over `steps` optimizer steps, from `distill.init`. CD and CT
    move their target θ⁻ with μ(k) (`distill.mu`, or the N(k)-driven schedule of CT); ECT's student
    is its own target."""
    init = distill_init(d)
    if d.mode == "ect":
        log.info("ect with distance %s, weighting %s, the student as its own target", *distill_distance(d))
        return ect_setup(d, sig, model_params.class_conditional, steps, device, part, init_path=init)
    metric = resolve_metric(d.metric, d.lpips_net, d.lpips_resize, device, d.huber_c)
    sched = ct_schedule_from(d, steps)
    if d.mode == "cd":
        setup = cd_setup(d, sig, model_params.class_conditional, device, metric, part, init_path=init)
    else:
        setup = ct_setup(d, sig, model_params, sched, device, metric, part, init_path=init)
    log.info("%s with metric %s, weighting %s, target mu %s", d.mode, d.metric, d.weighting,
             d.mu if d.mu_schedule == "fixed" else "mu(k)")
    return setup._replace(target_rate=sched.mu_at)


def cd_setup(d, sig: Sigmas, class_conditional: bool, device, metric, part: slice | None = None,
             cache_dir: Path = TRAJECTORIES, teacher_path: Path = TEACHER,
             manifest_path: Path = MANIFEST, init_path: Path | None = None) -> TrainingSetup:
    """CD: the student starts from the teacher's EMA and each step reads a batch of Heun pairs
    (params `distill`: batch_size, seed, dropout, weighting), from the trajectory cache
    (distill.pairs = cache) or made by the teacher inside the step (online).

    Under torchrun, `part` is this rank's rows of the global batch.
    """
    if d.pairs == "online":
        return cd_online_setup(d, sig, class_conditional, device, metric, part, manifest_path, teacher_path,
                               init_path)
    cache = read_cache(cache_dir, "pairs", "distill.mode cd and distill.pairs cache")
    if cache["num_scales"] != sig.num_scales:
        raise ShardError(f"the trajectory cache was made on a {cache['num_scales']}-point grid but "
                         f"diffusion.num_scales = {sig.num_scales}; run `dvc repro trajectories`")
    student, unet, teacher_classes = student_of_teacher(sig, class_conditional, device, d.dropout, d.seed,
                                                        init_path or teacher_path)
    n_all, xn_all, xnext_all, y_all = load_pairs([Path(s["path"]) for s in cache["shards"]], cache["shape"])
    if (y_all is None) != (teacher_classes is None):
        raise ShardError(f"the trajectory cache {cache_dir} and the teacher {teacher_path} disagree on class "
                         f"labels; rebuild the cache with `dvc repro trajectories`")
    n_all, xn_all, xnext_all = (resident(t, device) for t in (n_all, xn_all, xnext_all))
    log.info("cd: %d cached pairs, the student starts from %s's EMA", len(n_all), init_path or teacher_path)
    sampler = EpochSampler(len(n_all), d.batch_size, d.seed)

    def loss_at(step, g, target):
        i = sampler.indices(step)  # the global batch; under torchrun this rank keeps `part`
        i = i if part is None else i[part]
        y = None if y_all is None else y_all[i].to(device)
        j = i.to(xn_all.device)
        return cd_loss(student.with_labels(y), target.with_labels(y), n_all[j].to(device, non_blocking=True),
                       xn_all[j].to(device, non_blocking=True), xnext_all[j].to(device, non_blocking=True),
                       sig, metric, d.weighting)

    inputs = [[s["sha256"] for s in cache["shards"]], cache["teacher_sha256"], init_hash(init_path)]
    return TrainingSetup(student, unet, loss_at, inputs)


def init_hash(init_path: Path | None) -> str | None:
    """The start of the student in the resume fingerprint: the mid-trained file's hash, if any."""
    return sha256_file(init_path) if init_path is not None else None


def cd_online_setup(d, sig: Sigmas, class_conditional: bool, device, metric, part: slice | None,
                    manifest_path: Path, teacher_path: Path, init_path: Path | None = None) -> TrainingSetup:
    """CD as Algorithm 2 draws it: every step a fresh (x, n, z) and the teacher's Heun step from
    sigma_n to sigma_{n+1} (`cd_loss_online`), no pair read twice. Costs the teacher's two
    evaluations per image in the step, the price the cache pays once per pair."""
    student, unet, teacher_classes = student_of_teacher(sig, class_conditional, device, d.dropout, d.seed,
                                                        init_path or teacher_path)
    teacher = load_teacher(teacher_path, sig.sigma_data, device)
    images, labels, shard_hashes = train_images_for_teacher(teacher_classes, manifest_path, teacher_path)
    log.info("cd: %d training images, the teacher's Heun pairs made in each step (online); the student "
             "starts from the teacher's EMA", len(images))
    sampler = EpochSampler(len(images), d.batch_size, d.seed)

    def loss_at(step, g, target):
        i = sampler.indices(step)
        x = to_unit(images[i])
        n = torch.randint(sig.num_scales - 1, (len(x),), generator=g)
        z = torch.randn(x.shape, generator=g)  # drawn for the global batch, whatever the world size
        if part is not None:
            i, x, n, z = i[part], x[part], n[part], z[part]
        y = labels[i].to(device) if teacher_classes else None
        return cd_loss_online(student.with_labels(y), target.with_labels(y), teacher.with_labels(y),
                              x.to(device), n.to(device), z.to(device), sig, metric, d.weighting)

    return TrainingSetup(student, unet, loss_at, [shard_hashes, sha256_file(teacher_path), init_hash(init_path)])


def ct_setup(d, sig: Sigmas, model_params, sched: CTSchedule, device, metric, part: slice | None = None,
             manifest_path: Path = MANIFEST, init_path: Path | None = None) -> TrainingSetup:
    """CT from the training images alone: the student starts from random weights (the architecture
    of params `model`, the dropout of distill.dropout, seeded by distill.seed), or from the model at
    `init_path` (distill.init = midtrain), and step k uses the N(k)-point grid of `sched`.

    Under torchrun the noise and pair indices are drawn for the global batch, and this rank
    keeps its rows (`part`): the loss does not depend on the world size.
    """
    manifest = read_manifest(manifest_path)
    c, h, _ = manifest["shape"]
    images, labels = load_image_split(manifest_path, role="train")
    num_classes = model_num_classes(model_params.class_conditional, manifest["class_names"])
    if init_path is None:
        cfg_unet = unet_config(model_params.block_out_channels, model_params.layers_per_block,
                               model_params.attention_levels, d.dropout, h, c, num_classes)
        torch.manual_seed(d.seed)  # the initial weights
        student = ConsistencyFunction(build_unet(cfg_unet), sig.sigma_data, sig.sigma_min).to(device)
    else:
        student, cfg_unet, _ = student_of_teacher(sig, model_params.class_conditional, device, d.dropout, d.seed,
                                                  init_path)
    log.info("ct: %d training images, a %.2fM-parameter student from %s; N(k) %d -> %d, "
             "mu(k) %.4f -> %.4f", len(images), count_parameters(student) / 1e6, init_path or "random weights",
             sched.N(0), sched.N(sched.K), sched.mu_at(0), sched.mu_at(sched.K))
    sampler = EpochSampler(len(images), d.batch_size, d.seed)

    def loss_at(step, g, target):
        sigmas = sig.grid(sched.N(step))
        i = sampler.indices(step)
        x = to_unit(images[i])
        z = torch.randn(x.shape, generator=g)  # drawn for the global batch, whatever the world size
        n = sample_pair_indices(sigmas, len(x), g, d.ct_index, d.ict_P_mean, d.ict_P_std)
        if part is not None:
            i, x, z, n = i[part], x[part], z[part], n[part]
        y = labels[i].to(device) if num_classes else None
        return ct_loss(student.with_labels(y), target.with_labels(y), x.to(device), z.to(device), n, sigmas,
                       metric, d.weighting)

    return TrainingSetup(student, cfg_unet, loss_at, [train_shard_hashes(manifest), init_hash(init_path)])


def ect_setup(d, sig: Sigmas, class_conditional: bool, steps: int, device, part: slice | None = None,
              manifest_path: Path = MANIFEST, teacher_path: Path = TEACHER,
              init_path: Path | None = None) -> TrainingSetup:
    """ECT (Geng et al. 2025): the student starts from the teacher's EMA as in CD (dropout
    `distill.dropout`) and learns from the training images as CT, with
    no ODE solver and no target EMA: ln t ~ N(ect_P_mean, ect_P_std^2), r = ect_r(t, stage) with
    stage s = floor(step / d), d = ect_stage_images / batch_size steps, and `ect_loss`.

    Under torchrun t, z and r are drawn for the global batch and this rank keeps its rows (`part`).
    """
    stage_steps = max(1, d.ect_stage_images // d.batch_size)
    last = (steps - 1) // stage_steps
    # t - r = t q^-(s+1) n(t): past 2^-20 of t it is lost in float32's rounding of r (then t - r = 0).
    if (last + 1) * math.log2(d.ect_q) > 20:
        raise ParamsError(f"distill.ect_q = {d.ect_q} over {last + 1} stages (distill.images / "
                          f"distill.ect_stage_images) shrinks t - r below t / 2^20, which float32 cannot "
                          f"resolve: raise distill.ect_stage_images or lower distill.ect_q")
    student, unet, classes = student_of_teacher(sig, class_conditional, device, d.dropout, d.seed,
                                                init_path or teacher_path, ECTConsistencyFunction)
    images, labels, shard_hashes = train_images_for_teacher(classes, manifest_path, teacher_path)
    log.info("ect: %d training images, the student starts from %s's EMA (dropout %s); %d stage(s) of %d steps, "
             "q = %g, mapping %s", len(images), init_path or teacher_path, unet.get("dropout"), last + 1,
             stage_steps, d.ect_q, d.ect_mapping)
    sampler = EpochSampler(len(images), d.batch_size, d.seed)

    def loss_at(step, g, target):  # `target` is unused: the student is its own target
        i = sampler.indices(step)
        x = to_unit(images[i])
        t = ect_sample_t(len(x), g, d.ect_P_mean, d.ect_P_std)
        z = torch.randn(x.shape, generator=g)  # drawn for the global batch, whatever the world size
        r = ect_r(t, step // stage_steps, d.ect_q, d.ect_k, d.ect_b, d.ect_mapping)
        if part is not None:
            i, x, z, t, r = i[part], x[part], z[part], t[part], r[part]
        y = labels[i].to(device) if classes else None
        return ect_loss(student.with_labels(y), x.to(device), z.to(device), t.to(device), r.to(device),
                        d.ect_huber_c)

    return TrainingSetup(student, unet, loss_at, [shard_hashes, sha256_file(teacher_path), init_hash(init_path)])
