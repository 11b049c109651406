"""DINO: loss against a reference, centering, teacher EMA and temperature, multi-crop, KoLeo."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from objective_helpers import fit_same_batch, loss_before_and_after, one_torch_thread, real_views  # noqa: F401
from scratchpath.errors import ScratchpathError
from scratchpath.objectives.dino import DINO, dino_loss, koleo_loss, updated_center

SMALL = {
    "backbone": "vit_tiny_patch16_224",
    "backbone_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "dynamic_img_size": True},
    "out_dim": 128,
    "hidden_dim": 64,
    "bottleneck_dim": 32,
}


def reference_dino_loss(student, teacher, center, student_temp, teacher_temp):
    """The loop of DINOLoss.forward in Caron et al.'s reference code."""
    teacher_out = [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher]
    total, n_terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v, s in enumerate(student):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s / student_temp, dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms


def test_dino_loss_matches_reference_loop():
    torch.manual_seed(0)
    student, teacher, center = torch.randn(5, 4, 32), torch.randn(2, 4, 32), torch.randn(32)
    expected = reference_dino_loss(student, teacher, center, 0.1, 0.04)
    torch.testing.assert_close(dino_loss(student, teacher, center, 0.1, 0.04), expected)


def test_dino_loss_is_lowest_when_student_matches_sharpened_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(2, 8, 16)
    center = torch.zeros(16)
    matching = teacher.flip(0) * (0.1 / 0.04)  # each global crop's student = the other teacher
    assert dino_loss(matching, teacher, center) < dino_loss(torch.randn(2, 8, 16), teacher, center)


def test_center_is_ema_of_teacher_batch_mean():
    teacher = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    center = torch.ones(4)
    expected = 0.9 * center + 0.1 * teacher.reshape(6, 4).mean(dim=0)
    torch.testing.assert_close(updated_center(center, teacher, 0.9), expected)


def test_compute_loss_updates_center_buffer():
    torch.manual_seed(0)
    module = DINO(**SMALL, center_momentum=0.5)
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    module.compute_loss(views)
    assert module.center.abs().sum() > 0
    assert "center" in module.state_dict()


def test_teacher_receives_no_gradients_and_sees_only_global_crops():
    torch.manual_seed(0)
    module = DINO(**SMALL)
    teacher_batches, student_batches = [], []
    module.teacher_backbone.register_forward_hook(lambda m, i, o: teacher_batches.append(len(i[0])))
    module.backbone.register_forward_hook(lambda m, i, o: student_batches.append(len(i[0])))
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16)] * 3
    module.compute_loss(views).backward()
    assert teacher_batches == [2 * 4]  # both global crops, one pass
    assert student_batches == [2 * 4, 3 * 4]  # globals, then the local crops
    assert all(p.grad is None for p in module.teacher_backbone.parameters())
    assert all(p.grad is None for p in module.teacher_head.parameters())
    assert all(p.grad is not None for p in module.head.mlp.parameters())


def test_update_teacher_is_exponential_moving_average():
    torch.manual_seed(0)
    module = DINO(**SMALL)
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.add_(torch.randn_like(p))
    online = [p.clone() for p in module.backbone.parameters()]
    teacher = [p.clone() for p in module.teacher_backbone.parameters()]
    module.update_teacher(0.99)
    for o, t, new in zip(online, teacher, module.teacher_backbone.parameters(), strict=True):
        torch.testing.assert_close(new, 0.99 * t + 0.01 * o)


def test_teacher_temperature_warms_up_linearly(tiles_dir):
    views = real_views(tiles_dir, n_images=4, n_views=2, size=32, seed=0)
    module = DINO(
        **SMALL, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2.0,
        warmup_epochs=0,
    )  # fmt: skip
    assert module.current_teacher_temp() == pytest.approx(0.07)  # outside a run: no warm-up
    fit_same_batch(module, views, steps=2)  # 2 steps per epoch -> 4 warm-up steps
    assert module.current_teacher_temp() == pytest.approx(0.04 + 0.03 * 2 / 4)


def test_prototypes_stay_fixed_during_first_epoch(tiles_dir):
    views = real_views(tiles_dir, n_images=4, n_views=2, size=32, seed=0)
    module = DINO(**SMALL, warmup_epochs=0, lr=1e-3)
    last_layer = [p.clone() for p in module.head.last_layer.parameters()]
    mlp = [p.clone() for p in module.head.mlp.parameters()]
    fit_same_batch(module, views, steps=1)
    assert all(
        torch.equal(a, b)
        for a, b in zip(last_layer, module.head.last_layer.parameters(), strict=True)
    )
    assert not all(
        torch.equal(a, b) for a, b in zip(mlp, module.head.mlp.parameters(), strict=True)
    )


def test_koleo_matches_nearest_neighbour_definition():
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    unit = F.normalize(x, dim=-1)
    distances = torch.cdist(unit, unit) + torch.eye(6) * 10
    expected = -torch.log(distances.min(dim=1).values + 1e-8).mean()
    torch.testing.assert_close(koleo_loss(x), expected)


def test_koleo_penalises_collapsed_features_more_than_spread_ones():
    torch.manual_seed(0)
    spread = torch.randn(16, 8)
    collapsed = torch.ones(16, 8) + 0.01 * torch.randn(16, 8)
    assert koleo_loss(collapsed) > koleo_loss(spread)


def test_fixed_size_vit_rejects_local_crops_with_clear_error():
    module = DINO(**{**SMALL, "backbone_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}})
    views = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)]
    with pytest.raises(ScratchpathError, match="dynamic_img_size"):
        module.compute_loss(views)


def test_dino_with_koleo_loss_decreases_on_real_multicrop_tiles(tiles_dir):
    torch.manual_seed(0)
    views = real_views(tiles_dir, n_images=16, n_views=0, size=0, seed=0, sizes=[32, 32, 16, 16])
    module = DINO(
        **SMALL, koleo_weight=0.1, momentum=0.9, lr=1e-3, lr_reference_batch=16,
        warmup_epochs=0, min_lr=1e-4, freeze_last_layer_epochs=0,
    )  # fmt: skip
    before, after = loss_before_and_after(module, views, steps=8)
    assert after < 0.9 * before, (before, after)
