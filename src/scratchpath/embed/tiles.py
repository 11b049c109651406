"""Where ``embed`` gets its tiles: host batches read by worker threads, made into device tiles.

Three sources, one batch type (:class:`HostBatch`):

- slide, CPU path: :func:`scratchpath.ingest.iter_tiles` (``ingest``'s region read and area
  resampling) fills a uint8 ``(B, T, T, 3)`` array, pinned when the device is a GPU;
- slide, device path: the level's stored JPEG tiles that the batch's windows touch are read
  undecoded (:meth:`Slide.read_jpeg_tile`) into one :class:`~scratchpath.data.module.EncodedTiles`
  buffer; on the device they are decoded in one batched call (nvJPEG on CUDA), placed in a
  mosaic and the tile windows cut from it with one gather, then area-resampled there when the
  level is not within 5 % of the target µm/px. No pixel is decoded on the CPU;
- store: a patch store's tiles of one slide (JPEG stores: their bytes, decoded on the device as
  the training data module does; lossless codecs: decoded by the reader).

Per batch the device path holds one mosaic, the bounding box of the stored tiles the batch
touches: batches are runs of consecutive tiles in row-major order, so about
``ceil(B / tiles_per_row) + 1`` rows of stored tiles (≈ 100 MB for 256 tiles of a 50k-px-wide
slide), whatever the slide's size.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from scratchpath.data.module import EncodedTiles
from scratchpath.ingest import iter_tiles, level_corners
from scratchpath.slides import JpegTiles, open_slide


@dataclass
class HostBatch:
    """One batch of a slide's tiles on the host, as a worker thread read it."""

    first: int  # position of the batch's first tile in the slide's tile list
    n: int
    tiles: torch.Tensor | None = None  # (B, T, T, 3) uint8 (CPU path, lossless stores)
    encoded: EncodedTiles | None = None  # JPEG bytes (device path, JPEG stores)
    # device path only: where the decoded stored tiles go and where the windows are
    slots: torch.Tensor | None = None  # (K, 2) int64 (row, col) in the mosaic
    mosaic: tuple[int, int] = (0, 0)  # rows, cols of stored tiles
    rows: torch.Tensor | None = None  # (B, read) int64 mosaic pixel rows of each window
    cols: torch.Tensor | None = None  # (B, read) int64 mosaic pixel columns


@dataclass
class SlideTiles:
    """The tiles of one planned slide and how to read them (what a worker thread needs)."""

    path: str
    assume_mpp: float | None
    level: int
    read_size: int  # window edge in level px
    tile_size: int  # tile edge after resampling
    xy: np.ndarray  # (N, 2) level-0 corners
    jpeg: JpegTiles | None = None  # set: device path
    pin: bool = False

    def read(self, first: int, n: int) -> HostBatch:
        """Read tiles ``first .. first + n`` (runs in a worker thread)."""
        xy = self.xy[first : first + n]
        with open_slide(self.path, assume_mpp=self.assume_mpp) as slide:
            if self.jpeg is None:
                out = _empty((n, self.tile_size, self.tile_size, 3), self.pin)
                array = out.numpy()
                for i, tile in enumerate(
                    iter_tiles(slide, self.level, self.read_size, self.tile_size, xy)
                ):
                    array[i] = tile
                return HostBatch(first, n, tiles=out)
            corners = level_corners(xy, slide.levels[self.level].downsample)
            return self._read_jpeg(slide, first, corners)

    def _read_jpeg(self, slide, first: int, corners: np.ndarray) -> HostBatch:
        grid, r = self.jpeg, self.read_size
        th, tw = grid.tile_height, grid.tile_width
        row0, col0 = corners[:, 1] // th, corners[:, 0] // tw  # (B,) first stored tile touched
        row1, col1 = (corners[:, 1] + r - 1) // th, (corners[:, 0] + r - 1) // tw
        top, left = int(row0.min()), int(col0.min())
        shape = (int(row1.max()) - top + 1, int(col1.max()) - left + 1)
        needed = np.zeros(shape, bool)
        for a, b, c, d in zip(row0 - top, row1 - top, col0 - left, col1 - left, strict=True):
            needed[a : b + 1, c : d + 1] = True
        blobs, slots = [], []
        for rr, cc in zip(*np.nonzero(needed), strict=True):
            blob = slide.read_jpeg_tile(self.level, (top + rr) * grid.cols + left + cc)
            if blob is not None:  # not stored: stays white in the mosaic
                blobs.append(blob)
                slots.append((rr, cc))
        encoded = EncodedTiles.from_blobs(blobs)
        span = np.arange(r)
        rows = (corners[:, 1] - top * th)[:, None] + span  # (B, r)
        cols = (corners[:, 0] - left * tw)[:, None] + span
        index = [torch.as_tensor(np.asarray(slots, np.int64).reshape(-1, 2)),
                 torch.from_numpy(rows), torch.from_numpy(cols)]  # fmt: skip
        if self.pin:  # pinned: their copies to the device are asynchronous
            encoded, index = encoded.pin_memory(), [t.pin_memory() for t in index]
        slots_t, rows_t, cols_t = index
        return HostBatch(first, len(corners), encoded=encoded, slots=slots_t, mosaic=shape,
                         rows=rows_t, cols=cols_t)  # fmt: skip


@dataclass
class StoreTiles:
    """The tiles of one slide of a patch store (``indices`` into the store)."""

    store_path: str
    indices: np.ndarray
    encoded: bool  # JPEG store and device decode: hand over the bytes
    pin: bool = False
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def read(self, first: int, n: int) -> HostBatch:
        from scratchpath.store import PatchStore

        store = getattr(self._local, "store", None)
        if store is None:  # the reader's caches are per thread: one PatchStore per worker
            store = self._local.store = PatchStore(self.store_path)
        rows = self.indices[first : first + n]
        if self.encoded:
            encoded = EncodedTiles.from_blobs(store.read_encoded_batch(rows))
            return HostBatch(first, n, encoded=encoded.pin_memory() if self.pin else encoded)
        tiles = torch.from_numpy(store.read(rows))
        return HostBatch(first, n, tiles=tiles.pin_memory() if self.pin else tiles)


def _empty(shape: tuple[int, ...], pin: bool) -> torch.Tensor:
    # Filled in place by the worker: a pinned buffer needs no second copy before the transfer.
    return torch.empty(shape, dtype=torch.uint8, pin_memory=pin)


def device_tiles(
    batch: HostBatch, device: torch.device, read_size: int, tile_size: int
) -> torch.Tensor:
    """The batch's ``(B, 3, T, T)`` tiles on ``device`` (uint8, or float32 on the 0..255 scale
    when resampled there); asynchronous on CUDA."""
    if batch.tiles is not None:
        return batch.tiles.to(device, non_blocking=True).permute(0, 3, 1, 2)
    if batch.slots is None:  # a store's tiles: decoded tiles are the tiles
        return batch.encoded.decode(device)  # (B, 3, T, T) uint8
    rows, cols = batch.mosaic
    if len(batch.encoded):
        decoded = batch.encoded.decode(device)  # (K, 3, th, tw) uint8
        th, tw = decoded.shape[-2:]
        mosaic = torch.full((3, rows, cols, th, tw), 255, dtype=torch.uint8, device=device)
        slots = batch.slots.to(device, non_blocking=True)
        mosaic[:, slots[:, 0], slots[:, 1]] = decoded.transpose(0, 1)  # (3, K, th, tw)
        mosaic = mosaic.permute(0, 1, 3, 2, 4).reshape(3, rows * th, cols * tw)
    else:  # every tile the windows touch is missing from the file: white
        span = int(batch.rows.max()) + 1, int(batch.cols.max()) + 1
        mosaic = torch.full((3, *span), 255, dtype=torch.uint8, device=device)
    ys = batch.rows.to(device, non_blocking=True)
    xs = batch.cols.to(device, non_blocking=True)
    windows = mosaic[:, ys[:, :, None], xs[:, None, :]].transpose(0, 1)  # (B, 3, r, r)
    if read_size != tile_size:
        return area_resize(windows, tile_size)
    return windows


@functools.lru_cache(maxsize=16)
def area_matrix(source: int, target: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(target, source)`` weights of area resampling along one axis: output pixel ``i``
    averages the input span ``[i·s, (i+1)·s)``, ``s = source / target``, each input pixel
    weighted by how much of it the span covers (what OpenCV's ``INTER_AREA`` computes when
    shrinking, also for non-integer factors such as 257 -> 128). Cached: made on the device
    once per (size, device), not copied there per batch."""
    scale = source / target
    edges = torch.arange(target + 1, dtype=torch.float64) * scale  # (target + 1,)
    left, right = edges[:-1, None], edges[1:, None]
    pixels = torch.arange(source, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(right, pixels + 1) - torch.maximum(left, pixels)).clamp_min(0)
    return (overlap / scale).to(device=device, dtype=torch.float32)


def area_resize(tiles: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, r, r)`` tiles -> ``(B, C, size, size)`` float32 by area averaging (two small
    matrix products on the tiles' device; :func:`area_matrix`)."""
    weights = area_matrix(tiles.shape[-1], size, tiles.device)  # (size, r)
    return weights @ tiles.float() @ weights.T
