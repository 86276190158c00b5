"""Class-conditional models: the label reaches the UNet, labels are per-sample and seeded, the
trajectory cache carries them, grids have one row per class, and the diffusers round trip and
the generate command take a class."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_unet

from cmpipe.models import networks
from cmpipe.cm.karras import Sigmas, heun_step
from cmpipe.cm.precond import ConsistencyFunction, EDMDenoiser
from cmpipe.cm.sampling import consistency_sample
from cmpipe.data import write_shards
from cmpipe.export.diffusers import export_consistency_model, ts_to_diffusers_timesteps
from cmpipe.export.generate import main as generate_main
from cmpipe.util.images import class_rows
from cmpipe.models.networks import load_network, model_num_classes, unet_config
from cmpipe.sampling.sets import class_labels, class_rows as class_row_labels, cm_sampler, generate
from cmpipe.training.trajectories import compute_pairs, load_pairs

RES, K = 8, 3
SIG = Sigmas(num_scales=5)


def tiny_net(classes=K, seed=0):
    return tiny_unet(1, seed, RES, classes)[1]


def test_unet_config_adds_a_class_embedding_only_when_asked():
    assert "num_class_embeds" not in unet_config([8, 16], 1, [], 0.0, RES, 1)
    assert unet_config([8, 16], 1, [], 0.0, RES, 1, 10)["num_class_embeds"] == 10
    assert model_num_classes(False, ["a", "b"]) is None and model_num_classes(True, ["a", "b"]) == 2
    with pytest.raises(ValueError, match="model.class_conditional"):
        model_num_classes(True, [])


def test_the_label_changes_the_output_and_is_required():
    D = EDMDenoiser(tiny_net(), 0.5).eval()
    x, s = torch.randn(2, 1, RES, RES), torch.tensor([1.0, 1.0])
    with torch.no_grad():
        a = D(x, s, torch.tensor([0, 0]))
        b = D(x, s, torch.tensor([0, 2]))
        assert torch.equal(a[0], b[0]) and (a[1] - b[1]).abs().max() > 1e-4
        assert torch.equal(D.with_labels(torch.tensor([0, 2]))(x, s), b)
    assert D.num_classes == K
    with pytest.raises(ValueError, match="class-conditional .*needs a label"):
        D(x, s)
    with pytest.raises(ValueError, match="one label per image"):
        D(x, s, torch.tensor([0]))
    U = EDMDenoiser(networks.build_unet(unet_config([8, 16], 1, [], 0.0, RES, 1)), 0.5)
    assert U.num_classes is None and U.with_labels(None) is U
    with pytest.raises(ValueError, match="unconditional model"):
        U(x, s, torch.tensor([0, 1]))


def test_boundary_condition_holds_for_every_class():
    f = ConsistencyFunction(tiny_net(), 0.5, SIG.sigma_min).eval()
    x = torch.randn(3, 1, RES, RES)
    with torch.no_grad():
        assert torch.equal(f(x, torch.full((3,), SIG.sigma_min), torch.tensor([0, 1, 2])), x)


def test_labels_are_seeded_per_sample_and_checked():
    uniform = class_labels(10, seed=4)
    a = uniform(list(range(200)))
    assert a.dtype == torch.long and a.shape == (200,)
    assert torch.equal(uniform([5, 6, 7]), a[5:8])                 # independent of batching
    assert not torch.equal(class_labels(10, seed=5)(list(range(200))), a)
    assert set(a.tolist()) == set(range(10))                       # all classes drawn
    assert class_labels(10, 4, class_label=7)([0, 1, 9]).tolist() == [7, 7, 7]
    assert class_labels(None, 4) is None
    with pytest.raises(ValueError, match="not one of the model's classes 0..9"):
        class_labels(10, 4, class_label=10)
    with pytest.raises(ValueError, match="unconditional"):
        class_labels(None, 4, class_label=1)
    assert class_row_labels(8)(range(16, 26)).tolist() == [2] * 8 + [3] * 2


def test_class_rows_grid_picks_the_first_images_of_each_class():
    images = np.arange(7, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2)
    labels = np.array([1, 0, 1, 1, 2, 0, 1])
    g = class_rows(images, labels, num_classes=3, per_row=3)
    assert g.shape == (9, 2, 2, 1)
    assert g[:, 0, 0, 0].tolist() == [1, 5, 255, 0, 2, 3, 4, 255, 255]   # white where a class runs out


def test_sampler_gives_each_sample_its_class():
    f = ConsistencyFunction(tiny_net(), 0.5, SIG.sigma_min).eval()
    shape, dev = (1, RES, RES), torch.device("cpu")
    labels = class_labels(K, seed=1)
    got, _ = generate(cm_sampler(f, SIG, [0, 2], 1, shape, labels), 6, 4, shape, 1, dev, "t")
    one, _ = generate(cm_sampler(f, SIG, [0, 2], 1, shape, labels), 6, 6, shape, 1, dev, "t")
    assert np.array_equal(got, one)                                 # batch size does not matter
    other, _ = generate(cm_sampler(f, SIG, [0, 2], 1, shape, class_labels(K, 1, 0)), 6, 6, shape, 1, dev, "t")
    y = labels(range(6))
    same = (y == 0).numpy()
    assert np.array_equal(got[same], other[same]) and not np.array_equal(got[~same], other[~same])


def test_trajectory_cache_stores_the_class_and_conditions_the_teacher(tmp_path):
    T = EDMDenoiser(tiny_net(), 0.5).eval()
    images = torch.randint(0, 256, (5, 1, RES, RES), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 1, 0])
    recs = list(compute_pairs(T, images, 6, 3, SIG, 4, torch.device("cpu"), labels=labels,
                              parts_dir=tmp_path / "trajectories"))
    grid = SIG.grid().float()
    for r in recs:
        img, n = r["json"]["image"], r["cls"]
        assert r["json"]["label"] == int(labels[img])
        with torch.no_grad():
            want = heun_step(T.with_labels(labels[img:img + 1]), torch.from_numpy(r["xn.npy"])[None],
                             grid[n], grid[n + 1])[0]
        assert torch.allclose(torch.from_numpy(r["xnext.npy"]), want, atol=1e-4)
    n, xn, xnext, y = load_pairs(write_shards(tmp_path / "c", iter(recs), maxcount=4, prefix="pairs"),
                                 (1, RES, RES))
    assert y.tolist() == [int(labels[r["json"]["image"]]) for r in recs]


@pytest.fixture(scope="module")
def conditional_cm(tmp_path_factory):
    d = tmp_path_factory.mktemp("ccm")
    net = tiny_net(seed=3)
    cfg = unet_config([8, 16], 1, [], 0.0, RES, 1, K)
    sd = net.state_dict()
    model = d / "model.pt"
    networks.save_model(model, "consistency", cfg, {"ema": sd}, {"sigma_data": 0.5, "sigma_min": 0.002})
    exported = export_consistency_model(model, d / "export", sigmas=SIG)
    return model, exported


def test_exported_conditional_model_matches_our_sampler_in_diffusers(conditional_cm):
    from diffusers import ConsistencyModelPipeline

    model, exported = conditional_cm
    net, _ = load_network(model, ("consistency",))
    f = ConsistencyFunction(net, 0.5, SIG.sigma_min).eval()
    pipe = ConsistencyModelPipeline.from_pretrained(exported, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    y = torch.tensor([2, 0, 1])
    for ts in ([0], [0, 2]):
        gens = [torch.Generator().manual_seed(300 + i) for i in range(3)]
        out = pipe(batch_size=3, class_labels=y, num_inference_steps=None,
                   timesteps=ts_to_diffusers_timesteps(ts, 5), generator=gens, output_type="pt").images * 2 - 1
        replay = [torch.Generator().manual_seed(300 + i) for i in range(3)]
        draw = lambda *_: torch.cat([torch.randn((1, 1, RES, RES), generator=g) for g in replay])
        ours = consistency_sample(f.with_labels(y), draw(), SIG, ts, draw)
        assert (out - ours).abs().max().item() <= 1e-5


def test_generate_command_takes_a_class(conditional_cm, tmp_path):
    model, exported = conditional_cm
    params = tmp_path / "params.yaml"
    params.write_text("diffusion:\n  sigma_min: 0.002\n  sigma_max: 80.0\n  sigma_data: 0.5\n"
                      "  rho: 7.0\n  num_scales: 5\n")
    common = ["--count", "4", "--params", str(params), "--ts", "0,2"]
    generate_main(["--model", str(model), "--class", "2", "--out", str(tmp_path / "a"), *common])
    info = json.loads((tmp_path / "a" / "generate.json").read_text())
    assert info["labels"] == [2, 2, 2, 2] and info["num_classes"] == K
    generate_main(["--model", str(exported), "--out", str(tmp_path / "b"), *common])   # uniform classes
    assert len(json.loads((tmp_path / "b" / "generate.json").read_text())["labels"]) == 4
    with pytest.raises(SystemExit, match="not one of the model's classes 0..2"):
        generate_main(["--model", str(model), "--class", "3", "--out", str(tmp_path / "c"), *common])
