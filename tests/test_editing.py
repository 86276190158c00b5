"""Zero-shot editing (Algorithm 4): each task keeps its known part exactly, on a small real model."""
import math

import pytest
import torch

from cmpipe.cm.editing import (
    colorization,
    edit,
    inpainting,
    orthogonal_with_first,
    slerp,
    stroke_painting,
    super_resolution,
)
from cmpipe.cm.karras import Sigmas
from cmpipe.cm.precond import ConsistencyFunction
from cmpipe.editing.tasks import (
    bicubic_upsample_means,
    centre_box_mask,
    mean_fill,
    psnr,
    random_box_masks,
)
from cmpipe.models.networks import build_unet, unet_config

SIG = Sigmas(num_scales=18)


def small_model(channels):
    torch.manual_seed(0)
    net = build_unet(unet_config([8, 16], 1, [], 0.0, 16, channels))
    return ConsistencyFunction(net, SIG.sigma_data, SIG.sigma_min).eval()


def images(n, channels, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, 16, 16, generator=g) * 2 - 1


def noise_fn(shape, seed=2):
    return lambda k: torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100 + k))


def test_orthogonal_basis_with_a_given_first_axis():
    for d in (3, 4, 16):
        q = orthogonal_with_first(torch.ones(d))
        assert torch.allclose(q @ q.T, torch.eye(d, dtype=q.dtype), atol=1e-12)
        assert torch.allclose(q[0], torch.full((d,), 1 / math.sqrt(d), dtype=q.dtype), atol=1e-12)


@pytest.mark.parametrize("task", ["inpainting", "colorization", "super_resolution"])
def test_each_task_keeps_its_known_part(task):
    c = 1 if task == "super_resolution" else 3
    y = images(3, c)
    if task == "inpainting":
        con = inpainting(random_box_masks(3, 16, 16, torch.Generator().manual_seed(0)))
    elif task == "colorization":
        con = colorization(3)
    else:
        con = super_resolution(4, 16, 16)
    out = edit(small_model(c), y, con, SIG, [0, 6, 12], noise_fn(y.shape))
    assert out.shape == y.shape and torch.isfinite(out).all()
    keep = 1 - con.omega
    assert (con.forward(out) * keep - con.forward(y) * keep).abs().max() <= 1e-5
    # and the task really generated something where it did not know y
    assert (con.forward(out) * con.omega - con.forward(y) * con.omega).abs().max() > 1e-3


def test_known_parts_mean_what_they_say():
    y = images(2, 3)
    # inpainting keeps pixels, colorization the luma, super-resolution the patch means
    m = centre_box_mask(16, 16, 0.5)
    assert m.sum() == 64 and m[0, 0, 4:12, 4:12].all()
    x = images(2, 3, seed=5)
    assert torch.allclose(inpainting(m).project(x, y) * (1 - m), y * (1 - m))
    luma = lambda im: (im * torch.tensor([0.2989, 0.5870, 0.1140]).reshape(1, 3, 1, 1)).sum(1)
    assert torch.allclose(luma(colorization().project(x, y)), luma(y), atol=1e-6)
    assert not torch.allclose(colorization().project(x, y).mean(1), y.mean(1), atol=1e-3)  # not (1,1,1)
    sr = super_resolution(4, 16, 16).project(x, y)
    assert torch.allclose(torch.nn.functional.avg_pool2d(sr, 4), torch.nn.functional.avg_pool2d(y, 4), atol=1e-6)
    assert torch.allclose(super_resolution(4, 16, 16).inverse(super_resolution(4, 16, 16).forward(x)), x,
                          atol=1e-6)


def test_colorization_basis_starts_with_the_normalised_luma_vector():
    from cmpipe.cm.editing import orthogonal_with_first

    v = torch.tensor([0.2989, 0.5870, 0.1140], dtype=torch.float64)
    q = orthogonal_with_first(v)
    assert torch.allclose(q[0], v / v.norm(), atol=1e-12)
    assert torch.allclose(q @ q.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    # the constraint's A maps an image's colour to (luma / |luma|, two chroma axes)
    y = images(1, 3)
    a = colorization().forward(y)
    assert torch.allclose(a[:, 0], (y * (v / v.norm()).float().reshape(1, 3, 1, 1)).sum(1), atol=1e-6)


def test_bad_task_settings_fail_clearly():
    with pytest.raises(ValueError, match="RGB"):
        colorization(1)
    with pytest.raises(ValueError, match="divide"):
        super_resolution(3, 16, 16)
    with pytest.raises(ValueError, match="levels"):
        stroke_painting(images(1, 1), 4, 1)


def test_stroke_editing_starts_from_the_noised_painting():
    y = images(2, 1)
    s = stroke_painting(y, 4, 3)
    assert s.shape == y.shape and set(torch.unique(s).tolist()) <= {-1.0, 0.0, 1.0}
    out = edit(small_model(1), s, None, SIG, [8, 14], noise_fn(y.shape))
    assert out.shape == y.shape and out.abs().max() <= 1


def test_slerp_end_points_and_norm():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(2, 1, 16, 16, generator=g), torch.randn(2, 1, 16, 16, generator=g)
    assert torch.allclose(slerp(z0, z1, 0.0), z0, atol=1e-5) and torch.allclose(slerp(z0, z1, 1.0), z1, atol=1e-5)
    mid = slerp(z0, z1, 0.5)  # norms of Gaussian noises stay about sqrt(dim), unlike a linear mix
    assert abs(mid.flatten(1).norm(dim=1).mean() - 16) < 2.5
    assert torch.allclose(slerp(z0, z0, 0.3), z0)


def test_baselines_and_psnr_by_hand():
    y = torch.zeros(1, 1, 4, 4)
    assert psnr(y + 0.2, y).item() == pytest.approx(10 * math.log10(4 / 0.04))
    m = torch.zeros(1, 1, 4, 4)
    m[..., :2, :] = 1
    y2 = torch.arange(16.0).reshape(1, 1, 4, 4) / 16
    filled = mean_fill(y2, m)
    assert torch.allclose(filled[..., 2:, :], y2[..., 2:, :])
    assert torch.allclose(filled[..., :2, :], torch.full((1, 1, 2, 4), y2[..., 2:, :].mean().item()))
    flat = torch.full((1, 1, 8, 8), 0.25)
    assert torch.allclose(bicubic_upsample_means(flat, 4), flat)


def test_edit_params_are_checked_before_any_model():
    from types import SimpleNamespace

    from cmpipe.editing.runner import check_edit_params
    from cmpipe.errors import ParamsError

    e = SimpleNamespace(ts=[6, 12], stroke_ts=[8, 14], sr_factor=4, inpaint_mask="centre", stroke_image=None)
    check_edit_params(e, SIG, 16, 16)
    for change, message in [({"ts": [12, 6]}, r"edit\.ts = \[12, 6\] must increase strictly"),
                            ({"stroke_ts": [3, 18]}, r"edit\.stroke_ts.*at most 17"),
                            ({"sr_factor": 3}, r"edit\.sr_factor = 3 must divide the image size 16x16"),
                            ({"inpaint_mask": "nope.png"}, r"edit\.inpaint_mask = 'nope\.png': use centre, random"),
                            ({"stroke_image": "nope.png"}, r"edit\.stroke_image = 'nope\.png': no such file")]:
        with pytest.raises(ParamsError, match=message):
            check_edit_params(SimpleNamespace(**{**vars(e), **change}), SIG, 16, 16)


def test_inpainting_masks_of_each_kind(tmp_path):
    from PIL import Image

    from cmpipe.editing.tasks import inpainting_masks

    assert torch.equal(inpainting_masks("centre", 3, 8, 8, 0, 0.5)[2], centre_box_mask(8, 8, 0.5)[0])
    r = inpainting_masks("random", 3, 8, 8, 5, 0.5)
    assert r.shape == (3, 1, 8, 8) and torch.equal(r, inpainting_masks("random", 3, 8, 8, 5, 0.5))
    assert (r.flatten(1).sum(1) == 16).all()
    Image.fromarray((torch.eye(8) * 255).byte().numpy()).save(tmp_path / "m.png")
    assert torch.equal(inpainting_masks(str(tmp_path / "m.png"), 2, 8, 8, 0, 0.5)[1, 0], torch.eye(8))


def test_edit_noise_does_not_depend_on_the_batch():
    from cmpipe.editing.runner import edit_with_seed

    f, y = small_model(1), images(4, 1)
    con = inpainting(centre_box_mask(16, 16).expand(4, 1, 16, 16))
    whole = edit_with_seed(f, y, con, SIG, [6, 12], 3, 1)
    con2 = inpainting(centre_box_mask(16, 16).expand(2, 1, 16, 16))
    assert torch.allclose(whole[:2], edit_with_seed(f, y[:2], con2, SIG, [6, 12], 3, 1), atol=1e-6)
    assert not torch.allclose(whole, edit_with_seed(f, y, con, SIG, [6, 12], 3, 2))  # another task's stream


def test_run_edits_scores_every_task_and_writes_its_grid(tmp_path):
    from types import SimpleNamespace

    from cmpipe.editing.runner import run_edits

    e = SimpleNamespace(ts=[6, 12], stroke_ts=[8, 14], sr_factor=4, inpaint_mask="random", inpaint_fraction=0.5,
                        stroke_image=None, stroke_factor=4, stroke_levels=3, seed=0, interp_pairs=2,
                        interp_frames=3)
    lpips = lambda a, b: (a - b).abs().flatten(1).mean(1)  # noqa: E731 (a stand-in distance)
    metrics = run_edits(small_model(3), images(3, 3), None, SIG, e, tmp_path, lpips)
    for task in ("inpainting", "colorization", "super_resolution"):
        assert set(metrics[task]) >= {"psnr", "lpips", "baseline_psnr", "baseline_lpips"}
    assert metrics["count"] == 3 and metrics["interpolation"] == {"pairs": 2, "frames": 3}
    assert {p.name for p in tmp_path.iterdir()} == {"inpainting.png", "colorization.png", "super_resolution.png",
                                                   "stroke.png", "interpolation.png"}
    (tmp_path / "gray").mkdir()
    gray = run_edits(small_model(1), images(2, 1), None, SIG, e, tmp_path / "gray", lpips)
    assert "gray" in gray["colorization"]["skipped"] and not (tmp_path / "gray/colorization.png").exists()
