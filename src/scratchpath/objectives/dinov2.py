"""DINOv2: DINO on the class token + iBOT on masked patches (Oquab et al. 2023, arXiv:2304.07193).

One training step, as in the paper's pseudo-code (and ``ssl_meta_arch.forward_backward``)::

    masks = block_masks(global crops)                   # half the global crops, 10-50 % of patches
    t_cls, t_patch = teacher(global crops)              # the teacher sees every patch
    s_cls, s_patch = student(global crops, masks)       # masked patches -> a learnt mask token
    s_local = student(local crops)
    P_cls = center(t_cls head), P_patch = center(t_patch head at the masked positions)
    loss = DINO(s_cls ∪ s_local ← P_cls) + iBOT(s_patch ← P_patch) + KoLeo / KDE(s_cls)

Centering is DINO's EMA of the teacher output or the Sinkhorn-Knopp assignment (SwAV), both
over the global batch. The masked positions travel as a fixed-size index + weight (padded to the
largest count the masking can produce, as the reference's ``upperbound`` buffer), so a step has
fixed shapes and no device→host synchronisation.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from timm.models import checkpoint_seq
from torch import nn

from scratchpath.backbones import feature_dim
from scratchpath.errors import ScratchpathError
from scratchpath.objectives.collectives import (
    all_reduce_max,
    all_reduce_sum,
    rank_and_world_size,
)
from scratchpath.objectives.crops import forward_runs, size_rejected
from scratchpath.objectives.dino import (
    DINO,
    DINOHead,
    dino_cross_entropy,
    koleo_loss,
    updated_center,
)
from scratchpath.objectives.masking import PatchMasks, mask_capacity, sample_masks
from scratchpath.objectives.optim import layerwise_lr_scales

_VIT_PARTS = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "cls_token")


# --- losses -------------------------------------------------------------------------------------
def ibot_patch_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    weight: torch.Tensor,
    n_images: int,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """iBOT's masked-patch loss (``iBOTPatchLoss.forward_masked`` of the DINOv2 code).

    Args:
        student_logits: ``(M, K)`` student head outputs at the masked positions.
        teacher_probs: ``(M, K)`` centred teacher probabilities at the same positions.
        weight: ``(M,)`` 1 / (masked patches of the position's image); 0 for padding.
        n_images: number of global crops in the batch (masked or not).

    Returns:
        ``Σ_images mean_{masked patches} H(P_t, P_s) / n_images``.
    """
    log_probs = F.log_softmax(student_logits / student_temp, dim=-1)  # (M, K)
    cross_entropy = -(teacher_probs * log_probs).sum(dim=-1)  # (M,)
    return (cross_entropy * weight).sum() / n_images


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    iterations: int = 3,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sinkhorn-Knopp teacher assignment (SwAV; DINOv2's ``sinkhorn_knopp_teacher``).

    Alternately normalises ``exp(logits / τ)`` so that every prototype gets an equal share of the
    global batch and every sample's row sums to 1; sums run over all ranks.

    Args:
        teacher_logits: ``(N, K)`` teacher head outputs of this rank.
        teacher_temp: τ_t.
        iterations: normalisation rounds (3 in DINOv2).
        valid: ``(N,)`` 1 for real rows, 0 for padding (padding gets an all-zero row).

    Returns:
        ``(N, K)`` assignment probabilities.
    """
    logits = teacher_logits.float() / teacher_temp  # (N, K)
    if valid is None:
        valid = torch.ones(logits.shape[0], device=logits.device)
    # One shift for the whole global batch keeps exp() finite where the reference overflows;
    # a constant factor, it cancels in the first normalisation.
    real = torch.where(valid[:, None] > 0, logits, -torch.inf)
    q = torch.exp(real - all_reduce_max(real.max())).T  # (K, N), padding columns 0
    n_samples = all_reduce_sum(valid.sum())  # B of the reference, over all ranks
    n_prototypes = q.shape[0]
    tiny = torch.finfo(q.dtype).tiny  # guards 0 / 0 on padding (and underflowed prototypes)
    q = q / all_reduce_sum(q.sum())
    for _ in range(iterations):
        q = q / all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(tiny) / n_prototypes
        q = q / q.sum(dim=0, keepdim=True).clamp_min(tiny) / n_samples
    return (q * n_samples).T


def kde_loss(features: torch.Tensor, concentration: float = 5.0) -> torch.Tensor:
    """KDE uniformity regulariser (Virchow 2, Zimmermann et al. 2024 §3.2; kaiko Midnight).

    The log of a von Mises-Fisher kernel density estimate at each L2-normalised feature,
    averaged: ``mean_i log( (1/B) Σ_j exp(κ (x_iᵀx_j − 1)) )``. Minimising it spreads the
    features over the sphere like KoLeo, but the self term (j = i) bounds it, so near-duplicate
    tiles in a small batch cannot make it infinite as KoLeo's ``log(distance)`` does.
    """
    x = F.normalize(features.float(), dim=-1)
    log_kernel = concentration * (x @ x.T - 1.0)  # (B, B)
    return (torch.logsumexp(log_kernel, dim=1) - math.log(x.shape[0])).mean()


@torch.no_grad()
def updated_masked_center(
    center: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor, momentum: float
) -> torch.Tensor:
    """EMA of the mean teacher output over the masked patches of the global batch."""
    total = all_reduce_sum((teacher_logits * valid[:, None]).sum(dim=0))  # (K,)
    count = all_reduce_sum(valid.sum())
    return center * momentum + total / count.clamp_min(1.0) * (1.0 - momentum)


# --- the objective ------------------------------------------------------------------------------
class DINOv2(DINO):
    """DINOv2: DINO's class-token self-distillation + iBOT's masked-patch loss + KoLeo / KDE.

    Needs a timm Vision Transformer with a class token, e.g. ``vit_small_patch14_reg4_dinov2``
    (registers and LayerScale built in) with ``backbone_kwargs: {img_size: 224,
    drop_path_rate: 0.1, dynamic_img_size: true}``. The first ``n_global_crops`` views are the
    global crops; the rest are local crops. Defaults are DINOv2's ``ssl_default_config.yaml``.
    Everything of DINO is inherited (head, EMA teacher, teacher-temperature warm-up, frozen
    prototypes in the first epoch); the arguments below are DINOv2's additions.

    Args:
        ibot_weight: weight of the iBOT loss (1.0).
        ibot_separate_head: give iBOT its own head (``ibot_out_dim`` prototypes) instead of
            sharing DINO's.
        ibot_out_dim: prototypes of the separate iBOT head (default ``out_dim``).
        mask_probability: fraction of global crops that are masked (0.5).
        mask_ratio: range of the masked fraction of patches in a masked crop ((0.1, 0.5)).
        centering: ``"ema"`` (DINO's running center) or ``"sinkhorn_knopp"`` (DINOv2's choice for
            its big runs).
        sinkhorn_iterations: Sinkhorn-Knopp rounds.
        kde_weight: weight of the KDE regulariser on the student's global class tokens (0 off;
            kaiko Midnight: 0.05 with ``koleo_weight: 0``).
        kde_concentration: κ of the KDE's von Mises-Fisher kernel (5.0 in Virchow 2 / Midnight).
        layerwise_decay: LR multiplier per ViT block from the top (DINOv2: 0.9; 1.0 off).
        patch_embed_lr_mult: extra LR multiplier of the patch embedding (DINOv2: 0.2).
        **kwargs: :class:`~scratchpath.objectives.dino.DINO` and
            :class:`~scratchpath.objectives.base.SSLObjective` arguments.
    """

    objective_name = "dinov2"

    def __init__(
        self,
        ibot_weight: float = 1.0,
        ibot_separate_head: bool = False,
        ibot_out_dim: int | None = None,
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        centering: Literal["ema", "sinkhorn_knopp"] = "ema",
        sinkhorn_iterations: int = 3,
        kde_weight: float = 0.0,
        kde_concentration: float = 5.0,
        layerwise_decay: float = 0.9,
        patch_embed_lr_mult: float = 0.2,
        *,
        backbone: str = "vit_small_patch14_reg4_dinov2",
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: float = 30.0,
        momentum: float = 0.992,
        koleo_weight: float = 0.1,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= mask_probability <= 1.0:
            raise ScratchpathError(f"mask_probability: must be in [0, 1], got {mask_probability}")
        if not 0.0 <= mask_ratio[0] <= mask_ratio[1] <= 1.0:
            raise ScratchpathError(f"mask_ratio: need 0 <= min <= max <= 1, got {mask_ratio}")
        super().__init__(
            backbone=backbone,
            teacher_temp=teacher_temp,
            warmup_teacher_temp=warmup_teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            momentum=momentum,
            koleo_weight=koleo_weight,
            **kwargs,
        )
        vit = self.backbone
        missing = [part for part in _VIT_PARTS if getattr(vit, part, None) is None]
        if missing:
            raise ScratchpathError(
                f"backbone: DINOv2 needs a timm Vision Transformer with a class token, "
                f"{self.hparams.backbone!r} ({type(vit).__name__}) lacks {', '.join(missing)}"
            )
        hp = self.hparams
        dim = feature_dim(vit)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # replaces masked patch embeddings
        self.ibot_head: nn.Module = self.head
        self.teacher_ibot_head: nn.Module = self.teacher_head
        if ibot_separate_head:
            self.ibot_head = DINOHead(
                dim, ibot_out_dim or hp.out_dim, hp.hidden_dim, hp.bottleneck_dim,
                hp.head_layers, hp.norm_last_layer,
            )  # fmt: skip
            self.teacher_ibot_head = copy.deepcopy(self.ibot_head).requires_grad_(False)
        ibot_dim = (ibot_out_dim or hp.out_dim) if ibot_separate_head else hp.out_dim
        self.register_buffer("ibot_center", torch.zeros(ibot_dim))
        self._mask_step, self._mask_draw = -1, 0

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = super().teacher_pairs()
        if self.hparams.ibot_separate_head:
            pairs.append((self.ibot_head, self.teacher_ibot_head))
        return pairs

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def lr_scales(self) -> dict[str, float]:
        hp = self.hparams
        return layerwise_lr_scales(
            self.named_parameters(), len(self.backbone.blocks), hp.layerwise_decay,
            hp.patch_embed_lr_mult,
        )  # fmt: skip

    # --- the step -------------------------------------------------------------------------
    def compute_loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        hp = self.hparams
        n_global, batch = hp.n_global_crops, views[0].shape[0]
        if len(views) < n_global:
            raise ScratchpathError(
                f"n_global_crops: expected at least {n_global} views, the batch has {len(views)}"
            )
        global_crops = torch.cat(views[:n_global])  # (G·B, 3, H, W)
        n_images = global_crops.shape[0]
        masks = self.draw_masks(n_images, self.patch_grid(global_crops))

        with torch.no_grad():
            t_tokens = vit_tokens(self.teacher_backbone, global_crops)  # (G·B, prefix + L, D)
            t_cls, t_patches = self.split_tokens(t_tokens)
            t_masked = t_patches.flatten(0, 1).index_select(0, masks.index)  # (M, D), fixed M
            t_cls_logits, t_patch_logits = self._heads(
                self.teacher_head, self.teacher_ibot_head, t_cls, t_masked
            )

        s_tokens = vit_tokens(self.backbone, global_crops, masks.mask, self.mask_token)
        s_cls, s_patches = self.split_tokens(s_tokens)
        s_local = forward_runs(lambda crops: self.split_tokens(vit_tokens(self.backbone, crops))[0],
                               views[n_global:])  # fmt: skip
        s_cls_all = torch.cat([s_cls, *s_local])  # (V·B, D)
        s_masked = s_patches.flatten(0, 1).index_select(0, masks.index)  # (M, D)
        s_cls_logits, s_patch_logits = self._heads(self.head, self.ibot_head, s_cls_all, s_masked)

        with _full_precision(s_cls_logits.device):  # losses in fp32 under bf16 autocast
            teacher_temp = self.current_teacher_temp()
            t_cls_probs, t_patch_probs = self.teacher_probs(
                t_cls_logits.float(), t_patch_logits.float(), masks.weight > 0, teacher_temp
            )
            loss_dino = dino_cross_entropy(  # every (global g, other crop v) pair
                s_cls_logits.float().view(len(views), batch, -1),
                t_cls_probs.view(n_global, batch, -1),
                hp.student_temp,
            )
            loss_ibot = ibot_patch_loss(
                s_patch_logits.float(), t_patch_probs, masks.weight, n_images, hp.student_temp
            )
            loss = loss_dino + hp.ibot_weight * loss_ibot
            s_global = s_cls.float().view(n_global, batch, -1)
            if hp.koleo_weight > 0:
                loss = loss + hp.koleo_weight * sum(koleo_loss(f) for f in s_global)
            if hp.kde_weight > 0:
                loss = loss + hp.kde_weight * sum(
                    kde_loss(f, hp.kde_concentration) for f in s_global
                )
        if self._trainer is not None and self.trainer.state.status == "running":
            parts = {"train/dino_loss": loss_dino.detach(), "train/ibot_loss": loss_ibot.detach()}
            self.log_dict(parts, batch_size=batch)
        return loss

    def teacher_probs(
        self,
        cls_logits: torch.Tensor,
        patch_logits: torch.Tensor,
        valid: torch.Tensor,
        teacher_temp: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Centred, sharpened teacher targets of the class tokens and the masked patches."""
        hp = self.hparams
        if hp.centering == "sinkhorn_knopp":
            return (
                sinkhorn_knopp(cls_logits, teacher_temp, hp.sinkhorn_iterations),
                sinkhorn_knopp(patch_logits, teacher_temp, hp.sinkhorn_iterations, valid.float()),
            )
        cls_probs = F.softmax((cls_logits - self.center) / teacher_temp, dim=-1)
        patch_probs = F.softmax((patch_logits - self.ibot_center) / teacher_temp, dim=-1)
        with torch.no_grad():
            self.center.copy_(updated_center(self.center, cls_logits[None], hp.center_momentum))
            self.ibot_center.copy_(
                updated_masked_center(
                    self.ibot_center, patch_logits, valid.float(), hp.center_momentum
                )
            )
        return cls_probs, patch_probs

    def _heads(
        self, head: nn.Module, ibot_head: nn.Module, cls: torch.Tensor, patches: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DINO head on the class tokens, iBOT head on the patches (one pass when shared)."""
        if head is ibot_head:
            logits = head(torch.cat([cls, patches]))
            return logits[: len(cls)], logits[len(cls) :]
        return head(cls), ibot_head(patches)

    def split_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, prefix + L, D)`` → class token ``(B, D)``, patch tokens ``(B, L, D)``."""
        return tokens[:, 0], tokens[:, self.backbone.num_prefix_tokens :]

    def patch_grid(self, images: torch.Tensor) -> tuple[int, int]:
        """The ``(h, w)`` patch grid of ``images`` (B, 3, H, W)."""
        patch_h, patch_w = self.backbone.patch_embed.patch_size
        return images.shape[-2] // patch_h, images.shape[-1] // patch_w

    def draw_masks(self, n_images: int, grid: tuple[int, int]) -> PatchMasks:
        """Block masks of this step, drawn on the host from (seed, rank, step, micro-batch).

        Different on every rank, the same again when the run is repeated or resumed.
        """
        hp = self.hparams
        if self._mask_step != self.global_step:
            self._mask_step, self._mask_draw = self.global_step, 0
        rank, _ = rank_and_world_size()
        key = [torch.initial_seed() % 2**63, rank, self.global_step, self._mask_draw]
        self._mask_draw += 1
        rng = np.random.default_rng(key)
        ratio = (float(hp.mask_ratio[0]), float(hp.mask_ratio[1]))
        masks = sample_masks(n_images, grid, hp.mask_probability, ratio, rng)
        capacity = mask_capacity(n_images, grid[0] * grid[1], hp.mask_probability, ratio)
        return PatchMasks.from_numpy(masks, max(capacity, 1), self.mask_token.device)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        if self.current_epoch < self.hparams.freeze_last_layer_epochs:
            for param in self.ibot_head.last_layer.parameters():
                param.grad = None


def vit_tokens(
    vit: nn.Module,
    images: torch.Tensor,
    mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
) -> torch.Tensor:
    """A timm ViT's ``forward_features`` with masked patch embeddings replaced by ``mask_token``.

    ``mask`` is ``(B, L)`` bool over the patch grid; the positional embedding is added after the
    replacement, as in DINOv2's ``prepare_tokens_with_masks``. Returns ``(B, prefix + L, D)``.
    """
    try:
        x = vit.patch_embed(images)  # (B, L, D), or (B, h, w, D) with dynamic_img_size
    except AssertionError as error:  # timm's PatchEmbed rejects an unexpected input size
        raise size_rejected(images, error) from None
    if mask is not None:
        x = torch.where(mask.view(*x.shape[:-1], 1), mask_token.to(x.dtype), x)
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
    if getattr(vit, "grad_checkpointing", False):
        x = checkpoint_seq(vit.blocks, x)
    else:
        x = vit.blocks(x)
    return vit.norm(x)


def _full_precision(device: torch.device) -> Any:
    """Autocast off (losses in fp32) where autocast is on; a no-op elsewhere."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()
