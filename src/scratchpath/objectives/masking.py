"""iBOT's block masks for DINOv2's masked global crops (BEiT's masking, as in DINOv2's
``dinov2.data.masking.MaskingGenerator`` and ``collate_data_and_cast``).

Masks are drawn on the host with the step's numpy generator and travel to the device as
fixed-size tensors (:class:`PatchMasks`): the same shapes at every step, no device→host
synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from scratchpath.distributed import to_device


def block_mask(
    height: int,
    width: int,
    num_masked: int,
    rng: np.random.Generator,
    min_block: int = 4,
    max_block: int | None = None,
    min_aspect: float = 0.3,
) -> np.ndarray:
    """BEiT's block-wise mask of ``(height, width)`` patches with about ``num_masked`` set.

    Rectangles of 4 … ``max_block`` patches with log-uniform aspect ratio in
    (``min_aspect``, 1/``min_aspect``) are added until ``num_masked`` are covered; never more
    (``dinov2.data.masking.MaskingGenerator``; its max block is half the grid).
    """
    mask = np.zeros((height, width), dtype=bool)
    max_block = max_block or num_masked
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    count = 0
    while count < num_masked:
        budget = min(num_masked - count, max_block)
        added = 0
        for _ in range(10):  # a few tries at one block that adds something within the budget
            area = min_block + (budget - min_block) * rng.random()  # random.uniform(4, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if w < width and h < height:
                top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block[...] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask


@dataclass
class PatchMasks:
    """The masked patches of the student's global crops, as fixed-size tensors.

    Attributes:
        mask: ``(n_images, L)`` bool, True where the student sees the mask token.
        index: ``(M,)`` positions in the flattened ``(n_images · L)`` patch tokens; the first
            masked patches in row-major order, then padding (index 0).
        weight: ``(M,)`` 1 / (masked patches of that image), 0 for padding: each image's iBOT
            loss is the mean over its own masked patches.
    """

    mask: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor

    @classmethod
    def from_numpy(cls, masks: np.ndarray, capacity: int, device: torch.device) -> PatchMasks:
        """From ``(n_images, L)`` bool masks, padded to ``capacity`` masked positions."""
        flat = np.flatnonzero(masks)  # host-side: no device synchronisation
        if len(flat) > capacity:
            raise ValueError(f"{len(flat)} masked patches exceed the capacity {capacity}")
        counts = masks.sum(axis=1)
        index = np.zeros(capacity, dtype=np.int64)
        weight = np.zeros(capacity, dtype=np.float32)
        index[: len(flat)] = flat
        weight[: len(flat)] = 1.0 / counts[flat // masks.shape[1]]
        return cls(
            to_device(masks, torch.bool, device),  # pinned, non-blocking: no pageable copy
            to_device(index, torch.int64, device),
            to_device(weight, torch.float32, device),
        )


def mask_capacity(
    n_images: int, num_patches: int, mask_probability: float, mask_ratio: tuple[float, float]
) -> int:
    """The most patches :func:`sample_masks` can mask: the reference's ``upperbound``.

    ``int(n_images · p)`` images are masked, image i with a ratio drawn from the i-th of equal
    slices of ``mask_ratio``; the capacity sums the slices' upper ends, the same at every step.
    """
    n_masked = int(n_images * mask_probability)
    edges = np.linspace(*mask_ratio, n_masked + 1)
    return sum(int(num_patches * edges[i + 1]) for i in range(n_masked))


def sample_masks(
    n_images: int,
    grid: tuple[int, int],
    mask_probability: float,
    mask_ratio: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """``(n_images, h·w)`` block masks: a shuffled ``mask_probability`` of the images masked."""
    height, width = grid
    num_patches = height * width
    n_masked = int(n_images * mask_probability)
    edges = np.linspace(*mask_ratio, n_masked + 1)
    masks = np.zeros((n_images, num_patches), dtype=bool)
    for i in range(n_masked):
        target = int(num_patches * rng.uniform(edges[i], edges[i + 1]))
        masks[i] = block_mask(height, width, target, rng, max_block=num_patches // 2).ravel()
    return masks[rng.permutation(n_images)]
