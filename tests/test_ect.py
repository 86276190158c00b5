"""Easy Consistency Tuning (Geng et al. 2025): the t -> r mapping, the t distribution, the loss
and its shared dropout mask against values computed by hand, the student, and the params."""
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_unet

from cmpipe.cm.karras import Sigmas
from cmpipe.cm.losses import ect_loss, rewound_rng
from cmpipe.cm.precond import ConsistencyFunction, ECTConsistencyFunction, EDMDenoiser
from cmpipe.cm.schedules import ect_r, ect_sample_t
from cmpipe.pipeline import params


class Zero(torch.nn.Module):  # F = 0, so f(x, sigma) = c_skip(sigma) x
    def forward(self, x, t):
        return SimpleNamespace(sample=torch.zeros_like(x))


class Dropped(torch.nn.Module):  # F = a dropout mask of ones (p = 0.5, kept values 2)
    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x, t):
        return SimpleNamespace(sample=self.drop(torch.ones_like(x)))


def test_ect_r_by_hand():
    t = torch.tensor([1.0, 3.0, 0.1])
    # t = 1, stage 0, q = 2: n = 1 + 8 sigmoid(-1) = 3.151531; 1 - 3.151531 / 2 < 0 -> r = 0
    assert 1 + 8 / (1 + math.e) == pytest.approx(3.151531, abs=1e-6)
    # t = 3: n = 1 + 8 sigmoid(-3) = 1.379407; r = 3 (1 - 1.379407 / 2) = 0.930889
    assert ect_r(t, 0).tolist() == pytest.approx([0.0, 0.930889, 0.0], abs=1e-6)
    # stage 2 (q^3 = 8), t = 0.1: n = 1 + 8 sigmoid(-0.1) = 4.800166; r = 0.1 (1 - 4.800166/8)
    assert ect_r(t, 2)[2].item() == pytest.approx(0.0399979, abs=1e-7)
    # const: n = 1, r = t (1 - 2^-(s+1))
    assert ect_r(t, 0, mapping="const").tolist() == pytest.approx([0.5, 1.5, 0.05])
    assert ect_r(t, 1, mapping="const").tolist() == pytest.approx([0.75, 2.25, 0.075])
    # the one-hour recipe: q = 256, one stage; k = 0 is the const mapping
    assert ect_r(t, 0, q=256.0, k=0.0).tolist() == pytest.approx((t * (1 - 1 / 256)).tolist())
    with pytest.raises(ValueError, match="mapping"):
        ect_r(t, 0, mapping="linear")


def test_t_minus_r_halves_every_stage_where_r_is_positive():
    t = torch.logspace(-2, 2, 50)
    gaps = [t - ect_r(t, s) for s in range(6)]
    for s in range(2, 5):  # from stage 2 on r > 0 for every t > 0: n(t) <= 5 < q^(s+1)
        assert bool((ect_r(t, s) > 0).all())
        assert torch.allclose(gaps[s + 1], gaps[s] / 2, rtol=1e-5)
    assert torch.allclose(gaps[3], t * (1 + 8 * torch.sigmoid(-t)) / 16, rtol=1e-5)


def test_lognormal_t():
    t = ect_sample_t(200_000, torch.Generator().manual_seed(0), -1.1, 2.0)
    assert bool((t > 0).all())
    assert t.log().mean().item() == pytest.approx(-1.1, abs=0.02)
    assert t.log().std().item() == pytest.approx(2.0, abs=0.02)


def test_ect_loss_by_hand():
    f = ConsistencyFunction(Zero(), 0.5, 0.002)
    cs = lambda s: 0.25 / ((s - 0.002) ** 2 + 0.25)
    x = torch.tensor([[[[0.5, -0.5]]], [[[0.5, -0.5]]]])
    z = torch.tensor([[[[1.0, 2.0]]], [[[1.0, 2.0]]]])
    t, r = torch.tensor([1.0, 0.3]), torch.tensor([0.5, 0.0])

    def by_hand(c):
        rows = []
        # row 0: target f(x + r z, r); row 1 (r = 0): the target is x itself
        for ti, ri, tgt in ((1.0, 0.5, [cs(0.5) * (0.5 + 0.5), cs(0.5) * (-0.5 + 1.0)]),
                            (0.3, 0.0, [0.5, -0.5])):
            pred = [cs(ti) * (0.5 + ti), cs(ti) * (-0.5 + 2 * ti)]
            sq = sum((p - q) ** 2 for p, q in zip(pred, tgt))
            rows.append((math.sqrt(sq + c**2) - c) / (ti - ri))  # the weight 1/(t - r)
        return sum(rows) / 2

    assert ect_loss(f, x, z, t, r).item() == pytest.approx(by_hand(0.0), rel=1e-5)
    assert ect_loss(f, x, z, t, r, c=0.1).item() == pytest.approx(by_hand(0.1), rel=1e-5)


def test_shared_dropout_mask():
    x, z = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    t, r = torch.tensor([2.0, 1.0, 0.5, 0.2]), torch.tensor([1.0, 0.6, 0.1, 0.1])
    f = ConsistencyFunction(Dropped(), 0.5, 0.002).train()
    torch.manual_seed(3)
    m = torch.nn.functional.dropout(torch.ones_like(x), 0.5)  # the mask the student's forward draws
    after_one_forward = torch.get_rng_state()
    b = (-1, 1, 1, 1)

    def f_with(mask, xs, s):
        c_skip, c_out, _ = (c.reshape(b) for c in f.scalings(s))
        return c_skip * xs + c_out * mask

    pred, tgt = f_with(m, x + t.reshape(b) * z, t), f_with(m, x + r.reshape(b) * z, r)
    want = ((pred - tgt).flatten(1).norm(dim=1) / (t - r)).mean()
    torch.manual_seed(3)
    assert ect_loss(f, x, z, t, r).item() == pytest.approx(want.item(), rel=1e-5)
    # the RNG moves on as after one forward: the target replays the student's draws
    assert torch.equal(torch.get_rng_state(), after_one_forward)
    # a second mask for the target would give another value
    m2 = torch.nn.functional.dropout(torch.ones_like(x), 0.5)
    assert not torch.equal(m, m2)
    other = ((pred - f_with(m2, x + r.reshape(b) * z, r)).flatten(1).norm(dim=1) / (t - r)).mean()
    assert other.item() != pytest.approx(want.item(), rel=1e-3)
    # x_t == x_r and t == r: the rewound RNG gives student and target the same output
    with rewound_rng(x.device):
        a = f(x, t)
    assert torch.equal(a, f(x, t))


def test_ect_student_has_edm_scalings_in_training_and_the_boundary_at_sigma_min_in_eval():
    _, net = tiny_unet(1, seed=4)
    f = ECTConsistencyFunction(net, 0.5, 0.002).train()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    s = torch.tensor([1e-3, 0.3, 5.0])  # below, near and above sigma_min's scale
    with torch.no_grad():
        assert torch.allclose(f(x, s), EDMDenoiser(net, 0.5)(x, s))  # starts as an EDM teacher's D
        c_skip, c_out, _ = f.scalings(torch.zeros(3))                   # f(x, 0) = x: the boundary at 0
        assert torch.equal(c_skip, torch.ones(3)) and torch.equal(c_out, torch.zeros(3))
        f.eval()
        assert torch.equal(f(x, s), ConsistencyFunction(net, 0.5, 0.002)(x, s))
        assert torch.allclose(f(x, torch.full((3,), 0.002)), x)         # f(x, sigma_min) = x


def test_student_of_teacher_keeps_the_weights_with_another_dropout(tmp_path):
    from cmpipe.models import networks
    from cmpipe.pipeline.setups import student_of_teacher

    cfg, net = tiny_unet(1, seed=7)
    path = tmp_path / "teacher.pt"
    networks.save_model(path, "edm_teacher", cfg, {"ema": net.state_dict(), "model": net.state_dict()})
    sig = Sigmas()
    student, unet, classes = student_of_teacher(sig, False, "cpu", 0.2, 0, path, ECTConsistencyFunction)
    assert isinstance(student, ECTConsistencyFunction) and classes is None
    assert unet["dropout"] == 0.2 and cfg["dropout"] == 0.0
    assert {m.p for m in student.net.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0} == {0.2}
    sd = net.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in student.net.state_dict().items())
    student, unet, _ = student_of_teacher(sig, False, "cpu", 0.0, 0, path)  # the teacher's rate: its config
    assert type(student) is ConsistencyFunction and unet == cfg
    with pytest.raises(params.ParamsError, match="class_conditional"):
        student_of_teacher(sig, True, "cpu", 0.0, 0, path)


def test_ect_setup_refuses_a_gap_float32_cannot_resolve():
    from cmpipe.pipeline.setups.distill import ect_setup

    d = SimpleNamespace(ect_stage_images=64, batch_size=32, ect_q=2.0)
    with pytest.raises(params.ParamsError, match="ect_stage_images"):  # 50 stages: t - r = t n / 2^50
        ect_setup(d, Sigmas(), False, 100, "cpu")


def test_ect_params(tmp_path):
    import yaml
    from conftest import ROOT

    def load(**changes):
        data = yaml.safe_load((ROOT / "params.yaml").read_text())
        data["distill"].update(changes)
        p = tmp_path / "params.yaml"
        p.write_text(yaml.safe_dump(data))
        return params.load("distill", p)

    d = load(mode="ect", dropout=0.2, ect_q=256)
    assert d.mode == "ect" and d.dropout == 0.2 and d.ect_q == 256.0 and d.ect_huber_c == 0.0
    assert load(ect_mapping="const").ect_mapping == "const"
    for key, value, msg in (("ect_mapping", "linear", "is not one of"), ("ect_q", 0.5, "below its minimum"),
                            ("ect_huber_c", -0.1, "below its minimum"), ("dropout", 1.0, "above its maximum"),
                            ("ect_stage_images", 0, "below its minimum"), ("ect_P_std", 0.0, "below its minimum"),
                            ("mode", "ecm", "is not one of")):
        with pytest.raises(params.ParamsError, match=rf"distill\.{key} = .*{msg}"):
            load(**{key: value})
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    del data["distill"]["ect_b"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(params.ParamsError, match=r"missing key distill\.ect_b"):
        params.load("distill", tmp_path / "params.yaml")
