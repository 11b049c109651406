"""Multi-crop batches through a backbone: one pass per run of crops of one size.

DINO and DINOv2 both use :func:`forward_runs`, so they group their crops by the same rule:
consecutive views of one spatial size (the global crops, then the local ones) are concatenated
along the batch and go through the backbone together, in view order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from scratchpath.errors import ScratchpathError


def runs_of_equal_size(crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive (B, C, H, W) crops of one (H, W) concatenated: (k·B, C, H, W) per run."""
    runs: list[list[torch.Tensor]] = []
    for crop in crops:
        if runs and runs[-1][0].shape[-2:] == crop.shape[-2:]:
            runs[-1].append(crop)
        else:
            runs.append([crop])
    return [torch.cat(run) if len(run) > 1 else run[0] for run in runs]


def forward_runs(
    forward: Callable[[torch.Tensor], torch.Tensor], crops: list[torch.Tensor]
) -> list[torch.Tensor]:
    """``forward`` of each run of :func:`runs_of_equal_size`, in view order; a crop size the
    backbone rejects (timm's ``PatchEmbed`` asserts its input size) is a one-line error."""
    outputs = []
    for run in runs_of_equal_size(crops):
        try:
            outputs.append(forward(run))
        except AssertionError as error:
            raise size_rejected(run, error) from None
    return outputs


def size_rejected(crops: torch.Tensor, error: AssertionError) -> ScratchpathError:
    """The error for crops a fixed-size ViT rejects (timm's ``PatchEmbed`` asserts its size)."""
    return ScratchpathError(
        f"backbone_kwargs: {tuple(crops.shape[-2:])} crops do not fit the backbone "
        f"({error}); give ViTs dynamic_img_size: true for multi-crop"
    )
