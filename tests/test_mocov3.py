"""MoCo v3: the contrastive loss against a reference, the momentum encoder, real-tile training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from objective_helpers import fit_same_batch, loss_before_and_after, one_torch_thread, real_views  # noqa: F401
from scratchpath.objectives.mocov3 import MoCoV3, mocov3_loss

TINY = {
    "backbone": "vit_tiny_patch16_224",
    "backbone_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2},
    "proj_hidden_dim": 64,
    "proj_out_dim": 32,
}


def reference_ctr(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """Algorithm 1 of Chen, Xie and He 2021, one query at a time."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    losses = [
        -torch.log(torch.exp(q[i] @ k[i] / temperature) / torch.exp(q[i] @ k.T / temperature).sum())
        for i in range(len(q))
    ]
    return torch.stack(losses).mean() * 2 * temperature


def test_mocov3_loss_matches_reference():
    torch.manual_seed(0)
    q, k = torch.randn(6, 16), torch.randn(6, 16)
    torch.testing.assert_close(mocov3_loss(q, k, 0.2), reference_ctr(q, k, 0.2))


def test_mocov3_loss_uses_this_ranks_offset_into_gathered_keys():
    torch.manual_seed(0)
    q, k = torch.randn(8, 16), torch.randn(8, 16)
    per_rank = [mocov3_loss(q[r * 4 : r * 4 + 4], k[r * 4 : r * 4 + 4], 0.2, k, r) for r in (0, 1)]
    torch.testing.assert_close(torch.stack(per_rank).mean(), mocov3_loss(q, k, 0.2))


def test_mocov3_loss_is_lower_for_matching_keys_than_random_ones():
    torch.manual_seed(0)
    q = torch.randn(16, 32)
    assert mocov3_loss(q, q.clone(), 0.2) < mocov3_loss(q, torch.randn(16, 32), 0.2)


def test_key_encoder_starts_as_copy_and_gets_no_gradients():
    torch.manual_seed(0)
    module = MoCoV3(**TINY)
    for online, teacher in module.teacher_pairs():
        for p_online, p_teacher in zip(online.parameters(), teacher.parameters(), strict=True):
            torch.testing.assert_close(p_online, p_teacher)
    module.compute_loss([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]).backward()
    assert all(p.grad is None for p in module.teacher_backbone.parameters())
    assert all(p.grad is None for p in module.teacher_projector.parameters())
    assert all(p.grad is not None for p in module.predictor.parameters())


def test_key_encoder_follows_online_encoder_by_ema_after_each_step(tiles_dir):
    views = real_views(tiles_dir, n_images=8, n_views=2, size=32, seed=0)
    module = MoCoV3(**TINY, momentum=0.9, momentum_end=0.9, warmup_epochs=0)
    teacher_before = [p.clone() for p in module.teacher_backbone.parameters()]
    fit_same_batch(module, views, steps=1)
    for before, online, teacher in zip(
        teacher_before,
        module.backbone.parameters(),
        module.teacher_backbone.parameters(),
        strict=True,
    ):
        torch.testing.assert_close(teacher, 0.9 * before + 0.1 * online)
    assert any(
        not torch.equal(b, t)
        for b, t in zip(teacher_before, module.teacher_backbone.parameters(), strict=True)
    )


def test_mocov3_loss_decreases_on_real_tiles(tiles_dir):
    torch.manual_seed(0)
    views = real_views(tiles_dir, n_images=16, n_views=2, size=32, seed=0)
    module = MoCoV3(
        **TINY, lr=1e-3, lr_reference_batch=16, warmup_epochs=0, min_lr=1e-4, momentum=0.9
    )
    before, after = loss_before_and_after(module, views, steps=8)
    assert after < 0.9 * before, (before, after)
