"""MoCo v3: momentum contrast for ViTs (Chen, Xie and He 2021, arXiv:2104.02057)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scratchpath.backbones import feature_dim
from scratchpath.objectives.base import SSLObjective
from scratchpath.objectives.collectives import gather_no_grad, rank_and_world_size
from scratchpath.objectives.heads import projection_mlp


def mocov3_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    temperature: float = 0.2,
    all_k: torch.Tensor | None = None,
    rank: int = 0,
) -> torch.Tensor:
    """MoCo v3's InfoNCE ``ctr(q, k)`` (Algorithm 1), scaled by ``2τ``.

    Args:
        q: ``(B, D)`` this rank's queries (predictor outputs of the online encoder).
        k: ``(B, D)`` this rank's keys (momentum encoder, other view; no gradient).
        temperature: τ.
        all_k: ``(N, D)`` the keys of every rank in rank order; default ``k`` (one process).
        rank: this rank; query i's positive key is row ``rank·B + i`` of ``all_k``.

    Returns:
        ``2τ · CE(q·kᵀ/τ, positives)``, the mean over this rank's queries, in float32 even under
        bf16 autocast.
    """
    all_k = k if all_k is None else all_k
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        all_k = F.normalize(all_k.float(), dim=1)
        logits = q @ all_k.T / temperature  # (B, N)
        labels = rank * q.shape[0] + torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits, labels) * 2 * temperature


class MoCoV3(SSLObjective):
    """MoCo v3: online encoder + projector + predictor against a momentum key encoder.

    The loss is symmetric, ``ctr(q1, k2) + ctr(q2, k1)``, with keys gathered from all ranks. The
    paper's ViT-B recipe: AdamW, ``lr=1.5e-4`` per 256, ``weight_decay=0.1``, τ = 0.2, momentum
    0.99 → 1 (cosine), 40 warm-up epochs; ResNets use LARS and ``proj_layers=2``.

    Args:
        temperature: τ.
        proj_hidden_dim: hidden width of the projector and predictor MLPs.
        proj_out_dim: dimension of queries and keys.
        proj_layers: projector depth (3 for ViTs, 2 for ResNets in the paper).
        pred_layers: predictor depth.
        pred_last_norm: end the predictor with an affine-free BatchNorm (the paper's ViT code;
            its ResNet code uses ``False``).
        momentum: EMA momentum of the key encoder at the first step.
        momentum_end: EMA momentum at the last step.
        **kwargs: :class:`~scratchpath.objectives.base.SSLObjective` arguments.
    """

    objective_name = "mocov3"

    def __init__(
        self,
        temperature: float = 0.2,
        proj_hidden_dim: int = 4096,
        proj_out_dim: int = 256,
        proj_layers: int = 3,
        pred_layers: int = 2,
        pred_last_norm: bool = True,
        momentum: float = 0.99,
        momentum_end: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        dim = feature_dim(self.backbone)
        self.projector = projection_mlp(dim, proj_hidden_dim, proj_out_dim, proj_layers, True)
        self.predictor = projection_mlp(
            proj_out_dim, proj_hidden_dim, proj_out_dim, pred_layers, pred_last_norm
        )
        self.teacher_backbone = self.create_teacher_backbone()
        self.teacher_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.projector, self.teacher_projector)]

    def compute_loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        x1, x2 = views[0], views[1]
        q1 = self.predictor(self.projector(self.backbone(x1)))  # (B, D)
        q2 = self.predictor(self.projector(self.backbone(x2)))
        with torch.no_grad():
            k1 = self.teacher_projector(self.teacher_backbone(x1))  # (B, D)
            k2 = self.teacher_projector(self.teacher_backbone(x2))
        rank, _ = rank_and_world_size()
        tau = self.hparams.temperature
        return mocov3_loss(q1, k2, tau, gather_no_grad(k2), rank) + mocov3_loss(
            q2, k1, tau, gather_no_grad(k1), rank
        )
