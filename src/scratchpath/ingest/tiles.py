"""Tiles at a planned grid: the region reads and area downsampling that ingest and embed share."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from scratchpath.ingest.plan import TilingOptions
from scratchpath.slides import Slide, open_slide


def level_corners(xy: np.ndarray, downsample: float) -> np.ndarray:
    """``(N, 2)`` corners, in pixels of the level read, of the tiles whose level-0 corners are
    ``xy`` (the inverse of :func:`tile_grid`'s placement: exact for every tile it made)."""
    return np.rint(np.asarray(xy, np.float64).reshape(-1, 2) / downsample).astype(np.int64)


def iter_tiles(
    slide: Slide, level: int, read_size: int, tile_size: int, xy: np.ndarray
) -> Iterator[np.ndarray]:
    """The ``(tile_size, tile_size, 3)`` uint8 tiles with level-0 corners ``xy``: a
    ``read_size`` window of ``level``, area-downsampled to ``tile_size`` when they differ.
    What ``ingest`` stores (before encoding) and ``embed`` embeds on its CPU path."""
    import cv2

    for x, y in level_corners(xy, slide.levels[level].downsample).tolist():
        region = slide.read_region(level, x, y, read_size, read_size)
        if read_size != tile_size:
            region = cv2.resize(region, (tile_size, tile_size), interpolation=cv2.INTER_AREA)
        yield region


def read_tiles(
    path: str, options: TilingOptions, level: int, read_size: int, xy: np.ndarray, codec
) -> list[bytes]:
    """Read, resample and encode the tiles with level-0 corners ``xy`` (runs in a worker)."""
    with open_slide(path, assume_mpp=options.assume_mpp) as slide:
        tiles = iter_tiles(slide, level, read_size, options.tile_size, xy)
        return [codec.encode(tile) for tile in tiles]
