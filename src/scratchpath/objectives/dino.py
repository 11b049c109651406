"""DINO: self-distillation with no labels (Caron et al. 2021, arXiv:2104.14294)."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from scratchpath.backbones import feature_dim
from scratchpath.errors import ScratchpathError
from scratchpath.objectives.base import SSLObjective
from scratchpath.objectives.collectives import all_reduce_mean
from scratchpath.objectives.crops import forward_runs


def dino_cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float = 0.1
) -> torch.Tensor:
    """``H(P_t(g), P_s(v))`` averaged over images and over all pairs of a global crop g and a
    different crop v (DINO's Algorithm 1; DINOv2's local + global crop terms together).

    Args:
        student_logits: ``(V, B, K)`` student head outputs for all V crops.
        teacher_probs: ``(G, B, K)`` teacher targets for the G global crops, which are also the
            first G student crops (softmax of the centred logits, or Sinkhorn-Knopp).
        student_temp: τ_s.
    """
    # float32 even under bf16 autocast: a bf16 einsum over K = 65,536 is off in the 4th digit
    with torch.autocast(student_logits.device.type, enabled=False):
        student_log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
        batch = student_logits.shape[1]
        cross_entropy = (
            -torch.einsum("gbk,vbk->gv", teacher_probs.float(), student_log_probs) / batch
        )
        n_global, n_views = cross_entropy.shape
        other_crop = 1.0 - torch.eye(n_global, n_views, device=cross_entropy.device)
        # a weighted sum, not cross_entropy[mask]: boolean indexing would wait for the GPU
        return (cross_entropy * other_crop).sum() / (n_global * n_views - n_global)


def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """DINO's cross-entropy between the centred, sharpened teacher and the student (Algorithm 1).

    Args:
        student_logits: ``(V, B, K)`` student head outputs for all V crops.
        teacher_logits: ``(G, B, K)`` teacher head outputs for the G global crops, which are
            also the first G student crops.
        center: ``(K,)`` or ``(1, K)`` running mean of the teacher outputs.
        student_temp, teacher_temp: softmax temperatures τ_s and τ_t.

    Returns:
        ``H(P_t(g), P_s(v))`` averaged over images and over all pairs of a global crop g and a
        different crop v; in float32 even under bf16 autocast (a bf16 ``einsum`` over K =
        65,536 prototypes is off in the 4th digit).
    """
    with torch.autocast(student_logits.device.type, enabled=False):  # float32 even under bf16
        teacher = (teacher_logits.float() - center.float()) / teacher_temp
        teacher_probs = F.softmax(teacher, dim=-1)  # (G, B, K)
        return dino_cross_entropy(student_logits, teacher_probs, student_temp)


@torch.no_grad()
def updated_center(
    center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float
) -> torch.Tensor:
    """EMA of the teacher's mean output over the global batch (all-reduced across ranks).

    ``teacher_logits`` is ``(G, B, K)``; every rank contributes the same number of rows.
    """
    batch_center = all_reduce_mean(teacher_logits.mean(dim=(0, 1)))  # (K,)
    return center * momentum + batch_center * (1.0 - momentum)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo entropy regulariser on ``(B, D)`` features (Sablayrolles et al. 2019; DINOv2).

    ``−mean log ‖x_i − x_nn(i)‖`` on L2-normalised features: pushes nearest neighbours apart so
    that the features spread uniformly over the sphere.
    """
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), dim=-1, eps=eps)
        with torch.no_grad():
            similarity = x @ x.T  # (B, B)
            similarity.fill_diagonal_(-2.0)
            nearest = similarity.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], eps=eps)  # (B,)
        return -torch.log(distances + eps).mean()


class DINOHead(nn.Module):
    """MLP → L2 normalisation → weight-normalised linear layer to ``out_dim`` prototypes."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(dims):
            layers += [nn.Linear(d_in, d_out), nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(dims[-1], bottleneck_dim))
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad = not norm_last_layer  # fixed unit norm stabilises training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # (B, bottleneck)
        return self.last_layer(x)  # (B, out_dim)


class DINO(SSLObjective):
    """DINO: a student matches the EMA teacher's centred, sharpened output across crops.

    Multi-crop: the first ``n_global_crops`` views are global crops (seen by teacher and
    student), the rest local crops (student only). Crops of one size go through the backbone in
    one batch; ViTs fed crops of several sizes need ``backbone_kwargs: {dynamic_img_size: true}``.
    Paper ViT-S/16 recipe: AdamW, ``lr=5e-4`` per 256, ``min_lr=1e-6``, 10 warm-up epochs,
    weight decay 0.04 → 0.4, momentum 0.996 → 1, τ_t 0.04 (→ 0.07 after warm-up for long runs).

    Args:
        out_dim: number of prototypes K.
        hidden_dim, bottleneck_dim, head_layers: DINO head MLP.
        norm_last_layer: fix the norm of the prototypes (weight-norm magnitude) to 1.
        n_global_crops: how many of the first views are global crops.
        student_temp: τ_s.
        teacher_temp: τ_t after warm-up.
        warmup_teacher_temp: τ_t at step 0, raised linearly over ``warmup_teacher_temp_epochs``.
        warmup_teacher_temp_epochs: teacher-temperature warm-up length.
        center_momentum: EMA momentum of the teacher-output center.
        momentum, momentum_end: teacher EMA momentum, cosine from start to end.
        koleo_weight: weight of the KoLeo regulariser on the student's global-crop features
            (DINOv2 uses 0.1; 0 disables it).
        freeze_last_layer_epochs: epochs during which the prototypes receive no update.
        **kwargs: :class:`~scratchpath.objectives.base.SSLObjective` arguments.
    """

    objective_name = "dino"

    def __init__(
        self,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        norm_last_layer: bool = True,
        n_global_crops: int = 2,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: float = 0.0,
        center_momentum: float = 0.9,
        momentum: float = 0.996,
        momentum_end: float = 1.0,
        koleo_weight: float = 0.0,
        freeze_last_layer_epochs: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.head = DINOHead(
            feature_dim(self.backbone), out_dim, hidden_dim, bottleneck_dim, head_layers,
            norm_last_layer,
        )  # fmt: skip
        self.teacher_backbone = self.create_teacher_backbone()
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(out_dim))

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    def current_teacher_temp(self) -> float:
        """τ_t now: linear from ``warmup_teacher_temp`` to ``teacher_temp``, then constant."""
        hp = self.hparams
        warmup_steps = hp.warmup_teacher_temp_epochs * self.steps_per_epoch
        if self.global_step >= warmup_steps:
            return hp.teacher_temp
        fraction = self.global_step / warmup_steps
        return hp.warmup_teacher_temp + (hp.teacher_temp - hp.warmup_teacher_temp) * fraction

    def compute_loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        hp = self.hparams
        n_global, batch = hp.n_global_crops, views[0].shape[0]
        if len(views) < n_global:
            raise ScratchpathError(
                f"n_global_crops: expected at least {n_global} views, the batch has {len(views)}"
            )
        student_features = torch.cat(forward_runs(self.backbone, views))  # (V·B, D)
        student_logits = self.head(student_features).view(len(views), batch, -1)  # (V, B, K)
        with torch.no_grad():
            teacher_features = torch.cat(forward_runs(self.teacher_backbone, views[:n_global]))
            teacher_logits = self.teacher_head(teacher_features).view(n_global, batch, -1)
        loss = dino_loss(
            student_logits,
            teacher_logits,
            self.center,
            hp.student_temp,
            self.current_teacher_temp(),
        )
        if hp.koleo_weight > 0:
            global_features = student_features[: n_global * batch].view(n_global, batch, -1)
            loss = loss + hp.koleo_weight * sum(koleo_loss(f) for f in global_features)
        self.center.copy_(updated_center(self.center, teacher_logits.float(), hp.center_momentum))
        return loss

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self._is_logging_step():  # a logged Python number is a host-to-device copy
            self.log("train/teacher_temp", self.current_teacher_temp())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.current_epoch < self.hparams.freeze_last_layer_epochs:
            for param in self.head.last_layer.parameters():
                param.grad = None  # DINO keeps the prototypes fixed in the first epoch(s)
