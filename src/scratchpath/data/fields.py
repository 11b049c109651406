"""µm-continuous views: each view's physical field of view is drawn from a range in µm.

For a store cut at several µm/px (``scratchpath ingest --mpp 0.25 0.5 1 2``), a sample is a
tissue location: a uniformly random point of the sampled (anchor) tile, in µm on its slide.
Each view of the sample then

1. draws its field of view ``F`` (µm) from its range (``global_microns`` for the first
   ``n_global`` views, ``local_microns`` for the others), uniform or log-uniform in µm, and a
   centre shift of at most ``max_shift * F / 2`` from the location (so the location lies in
   every view: all views of a sample show the same tissue);
2. takes the stored tile of the **finest** µm/px whose tile is at least ``F`` wide and holds the
   location (tiles of all µm/px are linked by slide and level-0 position), moving the window
   the least needed to lie inside that tile (the location stays inside); when no stored tile
   is ``F`` wide the coarsest one is used and ``F`` shrinks to its width;
3. is resampled from that window to its output size with ``torchvision.ops.roi_align``
   (``aligned=True``: continuous coordinates, so the field of view is exact rather than rounded
   to source pixels; adaptive sampling averages several source pixels per output pixel when it
   shrinks, like area downsampling), and records its µm/px ``F / size``.

The plan (which tile, which window) is made per sample with a generator seeded by
(seed, epoch, anchor tile), so it is deterministic and independent of workers and ranks. The
crops run batched (one ``roi_align`` per output size) either in the data workers or, with
``on_device=True``, on the training device from the source tiles (then only the distinct source
tiles of a batch travel to the device: at most ``B * min(views, magnifications)``).

Cost: building the magnification index is O(N log N) once for N tiles (sort of int64 keys); a
batch costs O(B * V * K) searchsorted look-ups for K magnifications, one ``store.read`` of its
distinct source tiles and one ``roi_align`` per output size; no host sync on the device path
(boxes are computed on the host with the batch and travel with it).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from scratchpath.data.sampling import BatchRequest, sample_seed
from scratchpath.errors import ScratchpathError

FieldLaw = Literal["uniform", "log-uniform"]
_STREAM_FIELDS = 2  # sample_seed stream of the field-of-view plan (0, 1: CPU / device views)


class FieldsOfView:
    """How views' physical fields of view are drawn (a typed argument of ``PatchDataModule``).

    Args:
        global_microns: (min, max) field of view in µm of the first ``n_global`` views.
        local_microns: (min, max) field of view in µm of the other ``n_local`` views.
        n_global, n_local: number of views of each kind (match the view generator: e.g. DINO's
            2 global + 10 local crops, MAE's 1 view).
        global_size, local_size: output edge in px of each kind.
        law: ``"log-uniform"`` (each octave of field of view equally likely; the default) or
            ``"uniform"`` in µm.
        max_shift: a view's centre moves at most ``max_shift * F / 2`` from the sample's
            location (< 1 keeps the location inside every view).
        on_device: crop on the training device from the source tiles (True) or in the data
            workers (False).
    """

    def __init__(
        self,
        global_microns: tuple[float, float] = (64.0, 224.0),
        local_microns: tuple[float, float] = (16.0, 64.0),
        n_global: int = 2,
        n_local: int = 0,
        global_size: int = 224,
        local_size: int = 96,
        law: FieldLaw = "log-uniform",
        max_shift: float = 0.25,
        on_device: bool = False,
    ) -> None:
        for name, (low, high) in (("global_microns", global_microns),
                                  ("local_microns", local_microns)):  # fmt: skip
            if not 0 < low <= high:
                raise ScratchpathError(f"{name}: needs 0 < min <= max, got ({low}, {high})")
        if n_global < 0 or n_local < 0 or n_global + n_local == 0:
            raise ScratchpathError(
                f"n_global, n_local: need at least one view ({n_global}, {n_local})"
            )
        if global_size < 1 or local_size < 1:
            raise ScratchpathError("global_size, local_size: must be positive")
        if law not in ("uniform", "log-uniform"):
            raise ScratchpathError(f"law: must be 'uniform' or 'log-uniform', got {law!r}")
        if not 0 <= max_shift < 1:
            raise ScratchpathError(f"max_shift: must be within [0, 1), got {max_shift}")
        self.ranges = [tuple(map(float, global_microns))] * n_global + [
            tuple(map(float, local_microns))
        ] * n_local
        self.sizes = [int(global_size)] * n_global + [int(local_size)] * n_local
        self.n_views = n_global + n_local
        self.law = law
        self.max_shift = float(max_shift)
        self.on_device = bool(on_device)

    def draw(self, rng: np.random.Generator, n: int = 1) -> np.ndarray:
        """(n_views, n) fields of view in µm drawn from each view's range and the law."""
        low = np.array([r[0] for r in self.ranges])[:, None]
        high = np.array([r[1] for r in self.ranges])[:, None]
        u = rng.random((self.n_views, n))
        if self.law == "uniform":
            return low + (high - low) * u
        return np.exp(np.log(low) + (np.log(high) - np.log(low)) * u)


class MagnificationIndex:
    """Tiles of every µm/px of a store, linked by slide and physical position (µm).

    ``mpp`` of a tile is grouped to 2 significant digits (0.499 and 0.5 count as one); the
    tiles of one (slide, magnification) lie on the ingest grid, so the tile holding a point is
    found by its grid cell with one ``searchsorted``.
    """

    def __init__(self, store: Any) -> None:
        tiles = store.tiles
        slide_mpp = {int(s["slide_index"]): s.get("mpp") for s in store.slides
                     if s.get("status") == "ok"}  # fmt: skip
        slide = np.asarray(tiles["slide_index"], np.int64)
        level0_mpp = np.array([slide_mpp.get(int(s)) or np.nan for s in slide], np.float64)
        if len(slide) == 0 or not np.isfinite(level0_mpp).all():
            raise ScratchpathError(
                "data.fields: needs tiles cut from slides with a known µm/px (scratchpath ingest)"
            )
        self.tile_mpp = np.asarray(tiles["mpp"], np.float64)
        rounded = np.array([float(f"{m:.2g}") for m in self.tile_mpp])
        self.mpps, self.group = np.unique(rounded, return_inverse=True)  # finest first
        self.extent = store.tile_size * self.tile_mpp  # µm per tile side
        self.origin = np.stack([tiles["x"], tiles["y"]], axis=1) * level0_mpp[:, None]  # µm
        self.slide = slide
        self.tile_size = store.tile_size
        # Grid step (µm) of each (slide, magnification): the tile side.
        k = len(self.mpps)
        self._key_base = (slide * k + self.group).astype(np.int64)
        cell = np.rint(self.origin / self.extent[:, None]).astype(np.int64)
        keys = self._keys(self._key_base, cell)
        self._order = np.argsort(keys, kind="stable")
        self._keys_sorted = keys[self._order]
        step = np.zeros((slide.max() + 1, k))
        step[slide, self.group] = self.extent
        self._step = step

    @staticmethod
    def _keys(base: np.ndarray, cell: np.ndarray) -> np.ndarray:
        return (base << 40) | ((cell[..., 1] & 0xFFFFF) << 20) | (cell[..., 0] & 0xFFFFF)

    def tile_at(self, slide: np.ndarray, group: int, point: np.ndarray) -> np.ndarray:
        """Per point (µm, ``(n, 2)``), the tile of magnification ``group`` holding it, or -1."""
        step = self._step[slide, group]
        found = np.full(len(slide), -1, np.int64)
        valid = np.flatnonzero(step > 0)
        if len(valid) == 0:
            return found
        scaled = point[valid] / step[valid, None]
        cell = np.floor(scaled).astype(np.int64)
        # Grid corners are rounded to level-0 px: also try the nearer neighbouring cell.
        toward = np.where(scaled - cell < 0.5, -1, 1)
        base = slide[valid] * len(self.mpps) + group
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            todo = found[valid] < 0
            if not todo.any():
                break
            try_cell = cell + toward * np.array([dx, dy])
            keys = self._keys(base, try_cell)
            pos = np.searchsorted(self._keys_sorted, keys).clip(0, len(self._keys_sorted) - 1)
            candidate = np.where(self._keys_sorted[pos] == keys, self._order[pos], -1)
            rel = point[valid] - self.origin[candidate.clip(0)]
            extent = self.extent[candidate.clip(0), None]
            inside = (candidate >= 0) & ((rel >= 0) & (rel <= extent)).all(axis=1) & todo
            found[valid[inside]] = candidate[inside]
        return found


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
    """Where each view of each anchor comes from (see the module docstring)."""
    anchors = np.asarray(anchors, np.int64)
    b, v = len(anchors), fields.n_views
    fov = np.empty((v, b))
    shift = np.empty((v, b, 2))
    location = np.empty((b, 2))
    for i, rng in enumerate(rngs):  # per sample, so a sample's views never depend on its batch
        location[i] = index.origin[anchors[i]] + rng.random(2) * index.extent[anchors[i]]
        fov[:, i] = fields.draw(rng, 1)[:, 0]
        shift[:, i] = (rng.random((v, 2)) * 2 - 1) * fields.max_shift
    slide = index.slide[anchors]
    source = np.full((v, b), -1, np.int64)
    fallback = np.full(b, -1, np.int64)  # the coarsest tile holding the location
    for k in range(len(index.mpps)):  # finest first: keep the first that is wide enough
        holder = index.tile_at(slide, k, location)
        has = holder >= 0
        fallback = np.where(has, holder, fallback)
        wide = has[None, :] & (index.extent[holder.clip(0)][None, :] >= fov)  # (V, B)
        source = np.where((source < 0) & wide, holder[None, :], source)
    # No tile wide enough: the coarsest one, and F shrinks to its width.
    source = np.where(source < 0, fallback[None, :], source)
    if (source < 0).any():
        raise ScratchpathError("data.fields: an anchor tile is not linked to itself (store?)")
    extent = index.extent[source]
    fov = np.minimum(fov, extent)
    centre = location[None] + shift * fov[..., None] / 2
    low = centre - fov[..., None] / 2
    origin = index.origin[source]
    # Move the window the least needed to lie inside the source tile (the location stays in).
    low = np.clip(low, origin, origin + extent[..., None] - fov[..., None])
    mpp = index.tile_mpp[source][..., None]
    x0y0 = (low - origin) / mpp
    boxes = np.concatenate([x0y0, x0y0 + fov[..., None] / mpp], axis=-1)
    return FieldPlan(source, boxes, fov, fields.sizes, location)


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


class FieldViewBatches(Dataset):
    """Maps a :class:`BatchRequest` of anchor tiles to µm-continuous views (see module doc).

    Returns ``{"views": [uint8 (B, 3, s, s)] * V, "view_mpp": float32 (V, B), "index"}``, or with
    ``fields.on_device`` the source tiles and windows (``"field_tiles"``, ``"field_source"``,
    ``"field_boxes"``) that :func:`crop_fields` turns into the views on the device.
    """

    def __init__(self, store: Any, fields: FieldsOfView, seed: int) -> None:
        self.store = store
        self.fields = fields
        self.seed = seed
        self._index: MagnificationIndex | None = None

    @property
    def index(self) -> MagnificationIndex:
        if self._index is None:  # built in each worker on first use (not pickled to it)
            self._index = MagnificationIndex(self.store)
        return self._index

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_index": None}

    def plan(self, request: BatchRequest) -> FieldPlan:
        epoch, anchors = request
        rngs = [np.random.default_rng(sample_seed(self.seed, epoch, int(a), _STREAM_FIELDS))
                for a in anchors]  # fmt: skip
        return plan_fields(self.index, self.fields, anchors, rngs)

    def __getitem__(self, request: BatchRequest) -> dict[str, Any]:
        plan = self.plan(request)
        unique, inverse = np.unique(plan.source, return_inverse=True)
        tiles = torch.from_numpy(self.store.read(unique)).permute(0, 3, 1, 2).contiguous()
        tile_of_view = torch.from_numpy(inverse.reshape(plan.source.shape).astype(np.int64))
        boxes = torch.from_numpy(plan.boxes.astype(np.float32))
        batch = {
            "view_mpp": torch.from_numpy(plan.view_mpp.astype(np.float32)),  # (V, B)
            "index": torch.as_tensor(request[1], dtype=torch.int64),
        }
        if self.fields.on_device:
            return {**batch, "field_tiles": tiles, "field_source": tile_of_view,
                    "field_boxes": boxes}  # fmt: skip
        return {**batch, "views": crop_fields(tiles, tile_of_view, boxes, plan.sizes)}
