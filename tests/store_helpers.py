"""Helpers shared by the store and ingest tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scratchpath.store import StoreWriter

TILE = 256  # deeptexture tiles are 256×256 RGB JPEG: no resizing needed


def write_store(
    path: Path, tiles: np.ndarray, codec: str = "zstd", slides: int = 2, **kwargs
) -> None:
    """A store of ``tiles`` split over ``slides`` slides (group ``g<k>`` for slide k), in
    shards of 8 tiles; ``kwargs`` go to :class:`StoreWriter`."""
    per_slide = np.array_split(np.arange(len(tiles)), slides)
    with StoreWriter(path, tile_size=TILE, codec=codec, shard_size=8, **kwargs) as writer:
        for k, rows in enumerate(per_slide):
            record = {"source": f"slide{k}.svs", "slide_id": f"slide{k}", "sha256": f"sha{k}"}
            with writer.begin_slide(record) as slide:
                slide.add(tiles[rows], x=rows * 10, y=rows * 20, mpp=0.5, group=f"g{k}")


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of two uint8 images (inf when equal)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
