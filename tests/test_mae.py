"""MAE: masking, patch order, masked-only loss, timm ViT variants, real-tile training."""

from __future__ import annotations

import pytest
import torch

from objective_helpers import loss_before_and_after, one_torch_thread, real_views  # noqa: F401
from scratchpath.errors import ScratchpathError
from scratchpath.objectives.mae import MAE, mae_loss, patchify, random_masking

TINY_DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}


def test_random_masking_hides_mask_ratio_of_patches_per_image():
    torch.manual_seed(0)
    ids_keep, mask, ids_restore = random_masking(batch=3, num_patches=16, mask_ratio=0.75)
    assert ids_keep.shape == (3, 4)
    assert mask.sum(dim=1).tolist() == [12.0, 12.0, 12.0]
    for row in range(3):
        assert set(ids_keep[row].tolist()) == set(torch.nonzero(mask[row] == 0).flatten().tolist())
    # ids_restore inverts the shuffle whose first entries are the kept patches.
    assert torch.equal(ids_restore.argsort(dim=1)[:, :4], ids_keep)


def test_masks_differ_between_images():
    torch.manual_seed(0)
    _, mask, _ = random_masking(batch=2, num_patches=64, mask_ratio=0.75)
    assert not torch.equal(mask[0], mask[1])


def test_patchify_follows_vit_token_order():
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, patch_size=8)  # (2, 2·3, 8·8·3)
    row, col = 1, 2
    expected = images[:, :, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8].permute(0, 2, 3, 1)
    torch.testing.assert_close(patches[:, row * 3 + col], expected.reshape(2, -1))


def test_loss_counts_only_masked_patches():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 12), torch.randn(2, 4, 12)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    loss = mae_loss(pred, target, mask)
    changed_visible = pred.clone()
    changed_visible[mask == 0] += 5.0
    changed_masked = pred.clone()
    changed_masked[mask == 1] += 5.0
    assert mae_loss(changed_visible, target, mask) == loss
    assert mae_loss(changed_masked, target, mask) != loss


def test_norm_pix_loss_targets_per_patch_normalised_pixels():
    target = torch.randn(1, 2, 12) * 3 + 7
    normalised = (target - target.mean(-1, keepdim=True)) / (
        target.var(-1, keepdim=True) + 1e-6
    ).sqrt()
    mask = torch.ones(1, 2)
    assert mae_loss(normalised, target, mask, norm_pix=True) == pytest.approx(0.0, abs=1e-10)
    assert mae_loss(target, target, mask, norm_pix=False) == 0.0


def test_encoder_sees_only_visible_patches_and_prefix_tokens():
    module = MAE(backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, **TINY_DECODER)
    lengths = []
    module.backbone.blocks[0].register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1]))
    module.compute_loss([torch.randn(2, 3, 32, 32)])
    assert lengths == [1 + 16 // 4]  # class token + 25 % of 16 patches


def test_register_token_gap_vit_trains_every_used_parameter():
    module = MAE(
        backbone="vit_little_patch16_reg4_gap_256", backbone_kwargs=TINY_VIT, **TINY_DECODER
    )
    assert module.backbone.num_prefix_tokens == 4
    module.compute_loss([torch.randn(2, 3, 32, 32)]).backward()
    # DDP needs a gradient for every trainable parameter (fc_norm is the encoder norm here).
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_non_vit_backbone_is_rejected():
    with pytest.raises(ScratchpathError, match="backbone: MAE needs a timm Vision Transformer"):
        MAE(backbone="resnet18", **TINY_DECODER)


def test_mae_loss_decreases_on_real_tiles(tiles_dir):
    torch.manual_seed(0)
    views = real_views(tiles_dir, n_images=16, n_views=1, size=32, seed=0)
    module = MAE(
        backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, **TINY_DECODER,
        lr=2e-3, lr_reference_batch=16, warmup_epochs=0, min_lr=2e-4, adam_betas=(0.9, 0.95),
    )  # fmt: skip
    before, after = loss_before_and_after(module, views, steps=8)
    assert after < 0.9 * before, (before, after)
