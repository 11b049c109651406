"""MLP heads shared by the objectives (the collectives are in :mod:`.collectives`)."""

from __future__ import annotations

import itertools

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
