"""``crop_fields``: the batched crops of µm-continuous views (``torchvision.ops.roi_align``)."""

from __future__ import annotations

import torch


def crop_fields(
    tiles: torch.Tensor, tile_of_view: torch.Tensor, boxes: torch.Tensor, sizes: list[int]
) -> list[torch.Tensor]:
    """Batched crops: ``tiles`` (U, 3, T, T) uint8 source tiles, ``tile_of_view`` (V, B) which
    tile each view reads, ``boxes`` (V, B, 4) windows in source px -> V uint8 (B, 3, s, s)."""
    from torchvision.ops import roi_align

    v, b = tile_of_view.shape
    pixels = tiles.float()
    rois = torch.cat([tile_of_view.reshape(-1, 1).to(pixels), boxes.reshape(-1, 4).to(pixels)],
                     dim=1)  # fmt: skip
    rois = rois.view(v, b, 5)
    out: list[torch.Tensor | None] = [None] * v
    for size in sorted(set(sizes)):
        views = [i for i in range(v) if sizes[i] == size]
        # the views' rows by slicing on the device: no index tensor copied from the host
        rows = torch.cat([rois[i] for i in views])  # (len(views)·B, 5)
        crops = roi_align(pixels, rows, output_size=size, spatial_scale=1.0,
                          sampling_ratio=-1, aligned=True)  # fmt: skip
        crops = crops.round_().clamp_(0, 255).to(torch.uint8).view(len(views), b, 3, size, size)
        for j, i in enumerate(views):
            out[i] = crops[j]
    return out  # type: ignore[return-value]
