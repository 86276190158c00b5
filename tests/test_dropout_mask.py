"""The consistency loss runs the target with the student's dropout mask (openai's consistency_losses)."""
import copy

import torch

from cmpipe.cm.losses import consistency_loss, l2
from cmpipe.cm.precond import ConsistencyFunction
from cmpipe.models.networks import build_unet, unet_config


def test_target_with_the_students_weights_sees_the_same_dropout_mask():
    torch.manual_seed(0)
    net = build_unet(unet_config([16, 16], 1, [], 0.5, 8, 1))
    student = ConsistencyFunction(net, 0.5, 0.002).train()
    target = copy.deepcopy(student).train()
    x = torch.randn(4, 1, 8, 8)
    s = torch.full((4,), 1.3)
    # Same input, same weights, dropout p = 0.5 in both: one mask makes the two outputs equal.
    assert consistency_loss(student, target, x, s, x, s, l2).item() == 0.0
    # Without the shared mask the two draws differ (the loss would be the noise of dropout).
    a, b = student(x, s), target(x, s)
    assert (a - b).abs().max() > 1e-3


def test_the_mask_is_drawn_once_per_loss_and_the_rng_moves_on():
    torch.manual_seed(0)
    net = build_unet(unet_config([16, 16], 1, [], 0.5, 8, 1))
    student = ConsistencyFunction(net, 0.5, 0.002).train()
    x, s = torch.randn(2, 1, 8, 8), torch.full((2,), 0.7)
    torch.manual_seed(1)
    consistency_loss(student, student, x, s, x, s, l2)
    after_loss = torch.get_rng_state()
    torch.manual_seed(1)
    student(x, s)  # one forward's worth of draws
    assert torch.equal(after_loss, torch.get_rng_state())


def test_the_student_gets_its_own_dropout_with_the_teachers_weights():
    from cmpipe.pipeline.setups import with_dropout

    cfg = unet_config([16, 16], 1, [], 0.1, 8, 1)  # a teacher trained with dropout 0.1
    torch.manual_seed(0)
    teacher = build_unet(cfg)
    student, student_cfg = with_dropout(teacher, cfg, 0.0)  # distill.dropout: 0.0
    assert student_cfg["dropout"] == 0.0 and cfg["dropout"] == 0.1
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))
    assert {m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
    assert 0.1 in {m.p for m in teacher.modules() if isinstance(m, torch.nn.Dropout)}
    same, same_cfg = with_dropout(teacher, cfg, 0.1)
    assert same is teacher and same_cfg is cfg
