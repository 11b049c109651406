"""Heads and cross-rank collectives shared by the objectives."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn


def projection_mlp(
    in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_norm: bool = False
) -> nn.Sequential:
    """``num_layers`` linear layers with BatchNorm + ReLU between them.

    The projector of SimCLR (Chen et al. 2020) and the projector / predictor of MoCo v3 (Chen et
    al. 2021, ``_build_mlp``): hidden layers are Linear (no bias) -> BN -> ReLU; the last layer is
    a Linear, followed by an affine-free BN when ``last_norm``.
    """
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_norm:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every rank in rank order -> (world_size × B, ...).

    Gradients flow back to every rank's input (``torch.distributed.nn.functional.all_gather``),
    which contrastive losses over the global batch need to be exact.
    """
    if rank_and_world_size()[1] == 1:
        return x
    return torch.cat(dist_nn.all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather_with_grad` for tensors that need no gradient (momentum keys)."""
    world_size = rank_and_world_size()[1]
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over all ranks (``x`` itself outside ``torch.distributed``)."""
    world_size = rank_and_world_size()[1]
    if world_size == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size
