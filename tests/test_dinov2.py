"""DINOv2: iBOT patch loss, Sinkhorn-Knopp, KoLeo against lightly / DINOv2; KDE, masks, the step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightly.loss.ibot_loss import IBOTPatchLoss
from lightly.loss.koleo_loss import KoLeoLoss
from lightly.loss.msn_loss import sinkhorn as lightly_sinkhorn
from torch.utils._python_dispatch import TorchDispatchMode

from objective_helpers import loss_before_and_after, one_torch_thread, real_views  # noqa: F401
from scratchpath.errors import ScratchpathError
from scratchpath.objectives import OBJECTIVES, DINOv2
from scratchpath.objectives.dino import koleo_loss
from scratchpath.objectives.dinov2 import ibot_patch_loss, kde_loss, sinkhorn_knopp, vit_tokens
from scratchpath.objectives.masking import PatchMasks, block_mask, mask_capacity, sample_masks
from scratchpath.objectives.optim import layerwise_lr_scales

# A 2-block ViT with registers and LayerScale (the DINOv2 timm family), 4 px patches.
TINY = {
    "backbone": "vit_small_patch14_reg4_dinov2",
    "backbone_kwargs": {
        "img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2,
        "dynamic_img_size": True,
    },
    "out_dim": 128,
    "hidden_dim": 64,
    "bottleneck_dim": 32,
}  # fmt: skip


def multicrop(batch: int = 4, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [32, 32, 16, 16, 16]
    return [torch.randn(batch, 3, s, s, generator=generator) for s in sizes]


# --- references ---------------------------------------------------------------------------------
def dinov2_sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3):
    """``DINOLoss.sinkhorn_knopp_teacher`` of facebookresearch/dinov2, one process."""
    teacher_output = teacher_output.float()
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = Q.shape[1]
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def test_ibot_patch_loss_matches_lightly_loss_and_gradients():
    torch.manual_seed(0)
    masks = torch.rand(6, 4, 4) < 0.4
    masks[2] = False  # an unmasked image still counts in the denominator
    n_masked = int(masks.sum())
    teacher = torch.randn(n_masked, 32)
    student = torch.randn(n_masked, 32, requires_grad=True)
    reference = IBOTPatchLoss(output_dim=32, teacher_temp=0.04, student_temp=0.1)
    expected = reference(teacher, student, masks, teacher_temp=0.04)
    (expected_grad,) = torch.autograd.grad(expected, student)

    # ours: padded to a fixed capacity with junk rows of weight 0
    patch_masks = PatchMasks.from_numpy(masks.flatten(1).numpy(), n_masked + 5, torch.device("cpu"))
    padded = torch.cat([student, torch.randn(5, 32) * 100])
    teacher_probs = F.softmax(torch.cat([teacher, torch.randn(5, 32)]) / 0.04, dim=-1)
    loss = ibot_patch_loss(padded, teacher_probs, patch_masks.weight, n_images=6, student_temp=0.1)
    (grad,) = torch.autograd.grad(loss, student)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_patch_masks_index_rows_in_order_and_weight_each_image_to_one():
    masks = np.zeros((3, 6), dtype=bool)
    masks[0, [1, 4]] = True
    masks[2, [0, 2, 3]] = True
    patches = PatchMasks.from_numpy(masks, capacity=8, device=torch.device("cpu"))
    assert patches.index.tolist() == [1, 4, 12, 14, 15, 0, 0, 0]
    torch.testing.assert_close(patches.weight, torch.tensor([1 / 2] * 2 + [1 / 3] * 3 + [0.0] * 3))
    with pytest.raises(ValueError, match="capacity"):
        PatchMasks.from_numpy(masks, capacity=4, device=torch.device("cpu"))


def test_sinkhorn_knopp_matches_dinov2_and_lightly():
    torch.manual_seed(0)
    logits = torch.randn(24, 16)
    ours = sinkhorn_knopp(logits, teacher_temp=0.07, iterations=3)
    torch.testing.assert_close(ours, dinov2_sinkhorn_knopp(logits, 0.07))
    torch.testing.assert_close(ours, lightly_sinkhorn(torch.exp(logits / 0.07), iterations=3))
    torch.testing.assert_close(ours.sum(dim=1), torch.ones(24))  # each sample: a distribution
    # every prototype gets about an equal share of the batch (exactly after many rounds)
    balanced = sinkhorn_knopp(logits, teacher_temp=1.0, iterations=50)
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((16,), 24 / 16), rtol=1e-3, atol=0)


def test_sinkhorn_knopp_ignores_padding_rows():
    torch.manual_seed(0)
    logits = torch.randn(10, 16)
    padded = torch.cat([logits, torch.randn(4, 16) * 50])
    valid = torch.tensor([1.0] * 10 + [0.0] * 4)
    ours = sinkhorn_knopp(padded, 0.04, valid=valid)
    torch.testing.assert_close(ours[:10], dinov2_sinkhorn_knopp(logits, 0.04))
    assert torch.equal(ours[10:], torch.zeros(4, 16))


def test_sinkhorn_knopp_is_finite_where_the_reference_overflows():
    logits = torch.randn(8, 16) * 3  # unnormalised prototypes: exp(logits / 0.04) overflows
    assert not torch.isfinite(dinov2_sinkhorn_knopp(logits, 0.04)).all()
    assert torch.isfinite(sinkhorn_knopp(logits, 0.04)).all()


def test_koleo_matches_lightly_loss_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(16, 8, requires_grad=True)
    expected = KoLeoLoss()(x)
    (expected_grad,) = torch.autograd.grad(expected, x)
    loss = koleo_loss(x)
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_kde_matches_its_formula():
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    unit = x / x.norm(dim=1, keepdim=True)
    kappa = 5.0
    expected = 0.0
    for i in range(6):
        density = sum(math.exp(kappa * (float(unit[i] @ unit[j]) - 1.0)) for j in range(6)) / 6
        expected += math.log(density) / 6
    assert kde_loss(x, kappa).item() == pytest.approx(expected, rel=1e-5)


def test_kde_prefers_spread_features_and_stays_bounded_on_near_duplicates():
    torch.manual_seed(0)
    spread = torch.randn(32, 16)
    near_duplicates = (torch.ones(32, 16) + 1e-6 * torch.randn(32, 16)).requires_grad_()
    assert kde_loss(near_duplicates) > kde_loss(spread)
    (kde_grad,) = torch.autograd.grad(kde_loss(near_duplicates), near_duplicates)
    (koleo_grad,) = torch.autograd.grad(koleo_loss(near_duplicates), near_duplicates)
    assert kde_grad.norm() < 10  # KDE: bounded by its self term
    assert koleo_grad.norm() > 1e4  # KoLeo's small-batch failure: 1 / distance blows up


# --- masks --------------------------------------------------------------------------------------
def test_block_mask_covers_at_most_the_target_in_blocks():
    rng = np.random.default_rng(0)
    for target in (0, 5, 20, 40):
        mask = block_mask(14, 14, target, rng, max_block=98)
        assert mask.shape == (14, 14)
        assert mask.sum() <= target
        assert target == 0 or mask.sum() >= target // 2  # blocks fill most of the budget


def test_sample_masks_masks_half_the_crops_within_ratio_and_capacity():
    rng = np.random.default_rng(0)
    n_images, grid = 16, (8, 8)
    capacity = mask_capacity(n_images, 64, 0.5, (0.1, 0.5))
    for _ in range(20):
        masks = sample_masks(n_images, grid, 0.5, (0.1, 0.5), rng)
        counts = masks.sum(axis=1)
        assert (counts > 0).sum() <= 8 and (counts > 0).sum() >= 6
        assert counts.max() <= int(64 * 0.5)
        assert counts.sum() <= capacity


def test_masks_differ_between_steps_and_repeat_for_the_same_step():
    module = DINOv2(**TINY)
    first = module.draw_masks(8, (4, 4)).mask
    module._mask_step = -1  # the same step again, as after a resume
    assert torch.equal(module.draw_masks(8, (4, 4)).mask, first)
    assert not torch.equal(module.draw_masks(8, (4, 4)).mask, first)  # next micro-batch


# --- the objective ------------------------------------------------------------------------------
def test_registered_and_needs_a_vit_with_class_token():
    assert OBJECTIVES["dinov2"] is DINOv2
    with pytest.raises(ScratchpathError, match="Vision Transformer"):
        DINOv2(backbone="resnet18", out_dim=16, hidden_dim=16, bottleneck_dim=8)


def test_registers_and_layerscale_of_the_dinov2_vit():
    module = DINOv2(**TINY)
    assert module.backbone.num_prefix_tokens == 5  # class token + 4 registers
    assert type(module.backbone.blocks[0].ls1).__name__ == "LayerScale"


def test_vit_tokens_equal_forward_features_and_mask_token_replaces_patches():
    module = DINOv2(**TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit_tokens(module.backbone, x), module.backbone.forward_features(x))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 3] = True
    with torch.no_grad():
        module.mask_token.fill_(5.0)
    masked = vit_tokens(module.backbone, x, mask, module.mask_token)
    torch.testing.assert_close(masked[1], module.backbone.forward_features(x)[1])
    assert not torch.allclose(masked[0], module.backbone.forward_features(x)[0])


def test_teacher_sees_unmasked_crops_and_gets_no_gradient():
    torch.manual_seed(0)
    module = DINOv2(**TINY)
    teacher_inputs, student_inputs = [], []
    module.teacher_backbone.patch_embed.register_forward_hook(
        lambda m, i, o: teacher_inputs.append(i[0])
    )
    module.backbone.patch_embed.register_forward_hook(lambda m, i, o: student_inputs.append(i[0]))
    views = multicrop()
    module.compute_loss(views).backward()
    assert [len(x) for x in teacher_inputs] == [8]  # the two global crops only, one pass
    assert [len(x) for x in student_inputs] == [8, 12]  # masked globals, then the local crops
    assert torch.equal(teacher_inputs[0], torch.cat(views[:2]))
    assert all(p.grad is None for p in module.teacher_backbone.parameters())
    assert module.mask_token.grad is not None and module.mask_token.grad.abs().sum() > 0


def test_loss_is_dino_plus_ibot_plus_regularisers():
    views = multicrop()
    losses = {}
    for name, kwargs in {
        "dino": {"ibot_weight": 0.0, "koleo_weight": 0.0},
        "ibot": {"ibot_weight": 1.0, "koleo_weight": 0.0},
        "koleo": {"ibot_weight": 1.0, "koleo_weight": 0.1},
    }.items():
        torch.manual_seed(0)
        module = DINOv2(**TINY, **kwargs)
        losses[name] = module.compute_loss(views).item()
    assert losses["ibot"] > losses["dino"] and losses["koleo"] != losses["ibot"]


@pytest.mark.parametrize("centering", ["ema", "sinkhorn_knopp"])
@pytest.mark.parametrize("separate", [False, True])
def test_centering_and_heads_variants_train(centering, separate):
    torch.manual_seed(0)
    module = DINOv2(
        **TINY, centering=centering, ibot_separate_head=separate, ibot_out_dim=96,
        kde_weight=0.05, koleo_weight=0.0,
    )  # fmt: skip
    loss = module.compute_loss(multicrop())
    loss.backward()
    assert torch.isfinite(loss)
    assert (module.ibot_head is module.head) is not separate
    assert module.ibot_center.shape == (96 if separate else 128,)
    centers_moved = bool(module.center.abs().sum() > 0 and module.ibot_center.abs().sum() > 0)
    assert centers_moved is (centering == "ema")  # Sinkhorn-Knopp needs no running center


class RecordLossOps(TorchDispatchMode):
    """Records the dtype of every floating output from the first op on teacher logits
    (``(N, K)`` with K prototypes, after the heads) onwards: the loss computation."""

    def __init__(self, n_prototypes: int) -> None:
        super().__init__()
        self.n_prototypes = n_prototypes
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        on_logits = any(isinstance(a, torch.Tensor) and a.ndim == 2
                        and a.shape[-1] == self.n_prototypes for a in args)  # fmt: skip
        if name in ("_softmax", "exp", "sub") and on_logits:
            self.dtypes.append(out.dtype)  # the first step of either centering
        elif self.dtypes and isinstance(out, torch.Tensor) and out.is_floating_point():
            self.dtypes.append(out.dtype)
        return out


@pytest.mark.parametrize("centering", ["ema", "sinkhorn_knopp"])
def test_losses_are_fp32_under_bf16_autocast(centering):
    torch.manual_seed(0)
    module = DINOv2(**TINY, centering=centering)
    with torch.autocast("cpu", dtype=torch.bfloat16), RecordLossOps(128) as record:
        loss = module.compute_loss(multicrop())
    assert loss.dtype == torch.float32
    assert len(record.dtypes) > 20 and set(record.dtypes) == {torch.float32}


class CountSyncs(TorchDispatchMode):
    """Counts the ops that make the host wait for the device on a GPU."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "item")

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNCING:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("centering", ["ema", "sinkhorn_knopp"])
def test_training_step_loss_and_backward_have_no_host_syncs(centering):
    torch.manual_seed(0)
    module = DINOv2(**TINY, centering=centering, kde_weight=0.05)
    views = multicrop()
    with CountSyncs() as counter:
        loss = module.compute_loss(views)
        loss.backward()
    assert counter.syncs == []


def test_layerwise_lr_decay_scales_blocks_from_the_top():
    module = DINOv2(**TINY, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    scales = layerwise_lr_scales(module.named_parameters(), 2, 0.5, 0.2)
    assert scales["backbone.blocks.1.attn.qkv.weight"] == pytest.approx(0.5)
    assert scales["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.25)
    assert scales["backbone.pos_embed"] == pytest.approx(0.125)
    assert scales["backbone.patch_embed.proj.weight"] == pytest.approx(0.125 * 0.2)
    assert "head.mlp.0.weight" not in scales and "backbone.norm.weight" not in scales
    optimizer = module.configure_optimizers()
    by_id = {id(p): name for name, p in module.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            assert group["lr_scale"] == pytest.approx(scales.get(by_id[id(param)], 1.0))


def test_dinov2_loss_decreases_on_real_multicrop_tiles(tiles_dir):
    torch.manual_seed(0)
    views = real_views(tiles_dir, n_images=16, n_views=0, size=0, seed=0, sizes=[32, 32, 16, 16])
    module = DINOv2(
        **TINY, momentum=0.9, lr=1e-3, lr_reference_batch=16, warmup_epochs=0, min_lr=1e-4,
        freeze_last_layer_epochs=0, teacher_temp=0.04, layerwise_decay=1.0,
    )  # fmt: skip
    before, after = loss_before_and_after(module, views, steps=8)
    assert after < 0.9 * before, (before, after)
