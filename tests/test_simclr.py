"""SimCLR: NT-Xent against a reference, its properties, and training on real H&E tiles."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from objective_helpers import fit_same_batch, loss_before_and_after, one_torch_thread, real_views  # noqa: F401
from scratchpath.objectives.simclr import SimCLR, nt_xent_loss

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}


def reference_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 1 of Chen et al. 2020 written as an explicit loop over the 2N anchors."""
    z = F.normalize(torch.cat([z_a, z_b]), dim=1)
    n = z_a.shape[0]
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        similarities = z @ z[i] / temperature
        others = torch.cat([similarities[:i], similarities[i + 1 :]])
        losses.append(-(similarities[positive] - torch.logsumexp(others, dim=0)))
    return torch.stack(losses).mean()


def test_nt_xent_matches_reference_loop():
    torch.manual_seed(0)
    z_a, z_b = torch.randn(6, 16), torch.randn(6, 16)
    torch.testing.assert_close(nt_xent_loss(z_a, z_b, 0.2), reference_nt_xent(z_a, z_b, 0.2))


def test_nt_xent_local_rows_with_rank_offset_average_to_global_loss():
    torch.manual_seed(0)
    z_a, z_b = torch.randn(8, 16), torch.randn(8, 16)
    per_rank = [
        nt_xent_loss(z_a[r * 4 : r * 4 + 4], z_b[r * 4 : r * 4 + 4], 0.1, z_a, z_b, rank=r)
        for r in range(2)
    ]
    torch.testing.assert_close(torch.stack(per_rank).mean(), nt_xent_loss(z_a, z_b, 0.1))


def test_nt_xent_identical_views_score_lower_than_unrelated_ones():
    torch.manual_seed(0)
    z_a = torch.randn(16, 32)
    assert nt_xent_loss(z_a, z_a.clone(), 0.1) < nt_xent_loss(z_a, torch.randn(16, 32), 0.1)


def test_nt_xent_is_symmetric_in_the_two_views():
    torch.manual_seed(0)
    z_a, z_b = torch.randn(5, 8), torch.randn(5, 8)
    torch.testing.assert_close(nt_xent_loss(z_a, z_b, 0.1), nt_xent_loss(z_b, z_a, 0.1))


def test_simclr_loss_decreases_on_real_tiles(tiles_dir):
    torch.manual_seed(0)
    views = real_views(tiles_dir, n_images=16, n_views=2, size=32, seed=0)
    module = SimCLR(
        backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, proj_hidden_dim=64,
        proj_out_dim=32, lr=1e-3, lr_reference_batch=16, warmup_epochs=0, min_lr=1e-4,
    )  # fmt: skip
    before, after = loss_before_and_after(module, views, steps=8)
    assert after < 0.9 * before, (before, after)


def test_simclr_trains_a_cnn_backbone(tiles_dir):
    views = real_views(tiles_dir, n_images=8, n_views=2, size=32, seed=1)
    module = SimCLR(backbone="resnet18", proj_hidden_dim=32, proj_out_dim=16, warmup_epochs=0)
    fit_same_batch(module, views, steps=1)
    assert module.global_step == 1


def test_simclr_projects_the_whole_pooled_width_of_a_catavgmax_cnn(tiles_dir):
    # global_pool="catavgmax" pools avg and max side by side: 2 x num_features per tile
    views = real_views(tiles_dir, n_images=4, n_views=2, size=32, seed=2)
    kwargs = {"channels": [8, 8, 16, 32], "global_pool": "catavgmax"}
    module = SimCLR(backbone="resnet10t", backbone_kwargs=kwargs, proj_hidden_dim=32,
                    proj_out_dim=16)  # fmt: skip
    assert module.projector[0].in_features == 64
    assert torch.isfinite(module.compute_loss(views))
