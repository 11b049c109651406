"""Cross-rank collectives of the objectives: rank / world size, gathers and all-reduces.

``rank_and_world_size`` is :func:`scratchpath.distributed.rank_and_world_size` (one
implementation for the data module, the objectives and the callbacks), re-exported here.

Every objective imports its collectives from here (never ``torch.distributed`` directly), so a
loss reads the same in one process and on many, and the tests fake or spawn ranks in one place.
Outside ``torch.distributed`` each function is the identity of one process. None of them moves
data to the host: on a GPU they add collectives, not device→host synchronisations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from scratchpath.distributed import rank_and_world_size

__all__ = [
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "gather_no_grad",
    "gather_with_grad",
    "rank_and_world_size",
]


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
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over all ranks (``x`` itself outside ``torch.distributed``); a new tensor."""
    if rank_and_world_size()[1] == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over all ranks (``x`` itself outside ``torch.distributed``)."""
    return all_reduce_sum(x) / rank_and_world_size()[1]


@torch.no_grad()
def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``x`` over all ranks (``x`` itself outside ``torch.distributed``)."""
    if rank_and_world_size()[1] == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x
