"""``plan_fields``: which stored tile and which window each view of a batch is cut from."""

from __future__ import annotations

import numpy as np

from scratchpath.data.fields.config import FieldsOfView
from scratchpath.data.fields.index import MagnificationIndex
from scratchpath.errors import ScratchpathError


class FieldPlan:
    """The views of a batch: source tile, window in its pixels and µm/px, per (view, sample)."""

    def __init__(self, source: np.ndarray, boxes: np.ndarray, fov: np.ndarray, sizes: list[int],
                 location: np.ndarray) -> None:  # fmt: skip
        self.source = source  # (V, B) int64 tile indices
        self.boxes = boxes  # (V, B, 4) x0, y0, x1, y1 in source-tile px (continuous)
        self.fov = fov  # (V, B) µm actually covered
        self.sizes = sizes
        self.location = location  # (B, 2) µm on the slide: inside every view of the sample
        self.view_mpp = fov / np.array(sizes, np.float64)[:, None]


def plan_fields(
    index: MagnificationIndex,
    fields: FieldsOfView,
    anchors: np.ndarray,
    rngs: list[np.random.Generator],
) -> FieldPlan:
    """Where each view of each anchor comes from (see :mod:`scratchpath.data.fields`)."""
    anchors = np.asarray(anchors, np.int64)
    b, v = len(anchors), fields.n_views
    fov = np.empty((v, b))
    shift = np.empty((v, b, 2))
    location = np.empty((b, 2))
    anchor_origin, anchor_extent = index.origin(anchors), index.extent(anchors)
    for i, rng in enumerate(rngs):  # per sample, so a sample's views never depend on its batch
        location[i] = anchor_origin[i] + rng.random(2) * anchor_extent[i]
        fov[:, i] = fields.draw(rng, 1)[:, 0]
        shift[:, i] = (rng.random((v, 2)) * 2 - 1) * fields.max_shift
    slide = np.asarray(index.slide[anchors], np.int64)
    source = np.full((v, b), -1, np.int64)
    fallback = np.full(b, -1, np.int64)  # the coarsest tile holding the location
    for k in range(len(index.mpps)):  # finest first: keep the first that is wide enough
        holder = index.tile_at(slide, k, location)
        has = holder >= 0
        fallback = np.where(has, holder, fallback)
        wide = has[None, :] & (index.extent(holder.clip(0))[None, :] >= fov)  # (V, B)
        source = np.where((source < 0) & wide, holder[None, :], source)
    # No tile wide enough: the coarsest one, and F shrinks to its width.
    source = np.where(source < 0, fallback[None, :], source)
    if (source < 0).any():
        raise ScratchpathError("data.fields: an anchor tile is not linked to itself (store?)")
    extent = index.extent(source)
    fov = np.minimum(fov, extent)
    centre = location[None] + shift * fov[..., None] / 2
    low = centre - fov[..., None] / 2
    origin = index.origin(source)
    # Move the window the least needed to lie inside the source tile (the location stays in).
    low = np.clip(low, origin, origin + extent[..., None] - fov[..., None])
    mpp = np.asarray(index.tile_mpp[source], np.float64)[..., None]
    x0y0 = (low - origin) / mpp
    boxes = np.concatenate([x0y0, x0y0 + fov[..., None] / mpp], axis=-1)
    return FieldPlan(source, boxes, fov, fields.sizes, location)
