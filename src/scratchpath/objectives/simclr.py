"""SimCLR: contrastive learning of two augmented views (Chen et al. 2020, arXiv:2002.05709)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from scratchpath.backbones import feature_dim
from scratchpath.objectives.base import SSLObjective
from scratchpath.objectives.collectives import gather_with_grad, rank_and_world_size
from scratchpath.objectives.heads import projection_mlp


def nt_xent_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.1,
    all_z_a: torch.Tensor | None = None,
    all_z_b: torch.Tensor | None = None,
    rank: int = 0,
) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross entropy of SimCLR (eq. 1).

    Every projection is a query; its positive is the other view of the same image, its negatives
    are the ``2N − 2`` other projections of the global batch (itself excluded).

    Args:
        z_a, z_b: ``(B, D)`` this rank's projections of view a and view b (row i = image i).
        temperature: τ.
        all_z_a, all_z_b: ``(N, D)`` the projections of every rank, in rank order (gathered with
            gradients); default: ``z_a``, ``z_b`` (one process).
        rank: this rank; its images are rows ``rank·B … rank·B + B − 1`` of ``all_z_*``.

    Returns:
        The mean loss over this rank's ``2B`` queries (averaged over ranks by DDP: the mean over
        the global batch). Computed in float32 even under bf16 autocast (bf16 logits at τ = 0.1
        give gradients a few % off).
    """
    with torch.autocast(z_a.device.type, enabled=False):
        return _nt_xent_fp32(
            z_a.float(),
            z_b.float(),
            temperature,
            None if all_z_a is None else all_z_a.float(),
            None if all_z_b is None else all_z_b.float(),
            rank,
        )


def _nt_xent_fp32(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float,
    all_z_a: torch.Tensor | None,
    all_z_b: torch.Tensor | None,
    rank: int,
) -> torch.Tensor:
    all_z_a = z_a if all_z_a is None else all_z_a
    all_z_b = z_b if all_z_b is None else all_z_b
    batch, n_global = z_a.shape[0], all_z_a.shape[0]
    queries = F.normalize(torch.cat([z_a, z_b]), dim=1)  # (2B, D)
    keys = F.normalize(torch.cat([all_z_a, all_z_b]), dim=1)  # (2N, D)
    logits = queries @ keys.T / temperature  # (2B, 2N)
    image = rank * batch + torch.arange(batch, device=z_a.device)  # global index of each image
    self_column = torch.cat([image, n_global + image])  # each query's own key
    positive_column = torch.cat([n_global + image, image])  # the other view of the same image
    rows = torch.arange(2 * batch, device=z_a.device)
    minus_inf = torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device)
    logits = logits.index_put((rows, self_column), minus_inf)  # no tensor made from host data
    return F.cross_entropy(logits, positive_column)


class SimCLR(SSLObjective):
    """SimCLR: backbone → projection MLP → NT-Xent over the global batch of two views.

    The paper trains ResNet-50 with LARS (``optimizer="lars"``, ``lr=0.3``, batch 4096,
    ``weight_decay=1e-6``, τ = 0.1); with ViTs AdamW is the usual choice. Embeddings are gathered
    from all ranks with gradients, so DDP training equals one process on the global batch.

    Args:
        temperature: τ of NT-Xent.
        proj_hidden_dim: hidden width of the projection MLP.
        proj_out_dim: dimension of the projections the loss compares.
        proj_layers: linear layers of the projection MLP (2 in SimCLR, 3 in SimCLR v2).
        **kwargs: :class:`~scratchpath.objectives.base.SSLObjective` arguments.
    """

    objective_name = "simclr"

    def __init__(
        self,
        temperature: float = 0.1,
        proj_hidden_dim: int = 2048,
        proj_out_dim: int = 128,
        proj_layers: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.projector = projection_mlp(
            feature_dim(self.backbone), proj_hidden_dim, proj_out_dim, proj_layers
        )

    def compute_loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        view_a, view_b = views[0], views[1]
        z = self.projector(self.backbone(torch.cat([view_a, view_b])))  # (2B, D)
        z_a, z_b = z.chunk(2)
        rank, _ = rank_and_world_size()
        all_z_a, all_z_b = gather_with_grad(z_a), gather_with_grad(z_b)  # (N, D) each
        return nt_xent_loss(z_a, z_b, self.hparams.temperature, all_z_a, all_z_b, rank)
