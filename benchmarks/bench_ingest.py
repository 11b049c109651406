"""How fast does `scratchpath ingest` turn real slides into stored tiles, per core?

Figure: ingest tiles/s with workers=1 (everything: hashing, thumbnail, tissue mask, region reads,
area downsampling, JPEG q90 encoding, shard + table writes, thumbnail PNGs), as a ratio against
a baseline measured in the same run on the same tiles: the bare work any pipeline must do,
i.e. decode each needed pyramid level once in one tifffile call (``imread(level=...)``), cut the
kept tiles, downsample them (cv2 INTER_AREA) and encode them with the same codec, nothing else.
A ratio near 1 means ingest adds little beyond decoding + encoding.

Second figure: reading the same tile windows through ``Slide.read_region`` (direct TIFF tile
decode + LRU cache) against tifffile's zarr store (``series.aszarr(level)`` slicing), the other
way to read only the tiles a window touches.

Data: SCRATCHPATH_TEST_DATA (default ../shared/data) / slides. Runs in about a minute, one core.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import tifffile
import zarr

from scratchpath.ingest import TilingOptions, ingest, plan_slide
from scratchpath.slides import open_slide
from scratchpath.store import PatchStore, TileCodec

DATA = Path(
    os.environ.get(
        "SCRATCHPATH_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
)
SLIDES = [
    "CMU-1-Small-Region.svs",  # Aperio JPEG, one level
    "TCGA-CR-7395-01A-01-TS1.svs",  # Aperio JPEG 2000, two levels (µm/px assumed 0.5)
    "CMU-1-Small-Region_derived_pyramid.ome.tif",  # OME-TIFF, SubIFD pyramid
    "CMU-1-Small-Region_derived_pyramid_pages.tif",  # plain pyramidal TIFF
]


def bare_decode_and_encode(store: PatchStore, tile_size: int, codec: TileCodec) -> float:
    """Seconds to decode each needed level whole, cut, downsample and encode the stored tiles."""
    start = time.perf_counter()
    for index, slide_row in enumerate(store.slides):
        rows = np.flatnonzero(store.tiles["slide_index"] == index)
        level = int(slide_row["level"])
        image = tifffile.imread(slide_row["source"], series=0, level=level)
        downsample = slide_row["width"] / image.shape[1]
        read = round(tile_size * slide_row["tile_mpp"] / (slide_row["mpp"] * downsample))
        for row in rows:
            x = round(store.tiles["x"][row] / downsample)
            y = round(store.tiles["y"][row] / downsample)
            tile = image[y : y + read, x : x + read, :3]
            if read != tile_size:
                tile = cv2.resize(tile, (tile_size, tile_size), interpolation=cv2.INTER_AREA)
            codec.encode(np.ascontiguousarray(tile))
    return time.perf_counter() - start


def region_reads(store: PatchStore, tile_size: int) -> tuple[float, float]:
    """Seconds to read every stored tile's window via Slide.read_region and via aszarr."""
    direct = via_zarr = 0.0
    for index, slide_row in enumerate(store.slides):
        rows = np.flatnonzero(store.tiles["slide_index"] == index)
        level = int(slide_row["level"])
        with open_slide(slide_row["source"], assume_mpp=0.5) as slide:
            downsample = slide.levels[level].downsample
            read = round(tile_size * slide_row["tile_mpp"] / slide.levels[level].mpp)
            xy = [
                (round(store.tiles["x"][r] / downsample), round(store.tiles["y"][r] / downsample))
                for r in rows
            ]
            start = time.perf_counter()
            for x, y in xy:
                slide.read_region(level, x, y, read, read)
            direct += time.perf_counter() - start
        with tifffile.TiffFile(slide_row["source"]) as tif:
            array = zarr.open_array(tif.series[0].aszarr(level=level), mode="r")
            start = time.perf_counter()
            for x, y in xy:
                array[y : y + read, x : x + read]
            via_zarr += time.perf_counter() - start
    return direct, via_zarr


def main() -> None:
    paths = [DATA / "slides" / name for name in SLIDES]
    print(f"slides: {', '.join(SLIDES)}  (one core, workers=1)")
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: imports and file cache, not timed
        ingest(paths[:1], Path(tmp) / "warm", mpp=2.0, tile_size=64, progress=False)
    for mpp in (0.5, 1.0):
        tile_size = 224
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report = ingest(paths, Path(tmp) / "store", mpp=mpp, tile_size=tile_size,
                            assume_mpp=0.5, progress=False)  # fmt: skip
            ingest_s = time.perf_counter() - start
            assert report.ok, report.failed
            store = PatchStore(Path(tmp) / "store")
            codec = TileCodec.parse("jpeg", tile_size, 90)
            bare_s = min(bare_decode_and_encode(store, tile_size, codec) for _ in range(2))
            direct_s, zarr_s = region_reads(store, tile_size)
        options = TilingOptions(mpp, tile_size, 0.5, 0.5)
        start = time.perf_counter()
        for path in paths:
            plan_slide(str(path), options, frozenset())
        plan_s = (time.perf_counter() - start) / len(paths)
        n = len(store)
        print(
            f"\n{mpp} µm/px, {tile_size} px tiles: {n} tiles kept\n"
            f"  ingest (all stages)          {n / ingest_s:8.1f} tiles/s   ({ingest_s:.2f} s)\n"
            f"  baseline: decode+cut+encode  {n / bare_s:8.1f} tiles/s   ({bare_s:.2f} s)\n"
            f"  ratio ingest / baseline      {bare_s / ingest_s:8.2f}x\n"
            f"  of which per-slide planning (hash, thumbnail, tissue mask, PNG): "
            f"{plan_s:.2f} s/slide\n"
            f"  window reads: Slide.read_region {n / direct_s:.0f}/s vs aszarr {n / zarr_s:.0f}/s "
            f"-> {zarr_s / direct_s:.2f}x"
        )


if __name__ == "__main__":
    main()
