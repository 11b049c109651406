"""How faithful, how big and how fast is each tile codec on a real slide?

The real CMU-1 SVS is ingested once, losslessly (zstd, at its native 0.499 µm/px, so no
resampling), and each stored tile is checked to equal the slide pixels that tifffile decodes at
the tile's recorded (x, y). Those source tiles are then encoded with each codec setting and
compared with the source: PSNR (dB, mean over tiles), bytes per tile, single-core decodes per
second (imagecodecs, as PatchStore.read does), and bytes and decode rate as ratios against the
old default ``jpeg:90:420`` measured in the same run. The JPEG decode rates include the damage
check every read makes (``jpeg_damage``); its own cost is printed against a bare imagecodecs
decode of the same default-codec tiles.

Data: SCRATCHPATH_TEST_DATA (default ../shared/data) / slides. Runs in well under a minute.
Last line: ``codecs: default jpeg:90:444 P dB (old default jpeg:90:420 Q dB), B x bytes``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from scratchpath.ingest import ingest
from scratchpath.store import PatchStore, TileCodec
from scratchpath.store.codecs import jpeg_damage

DATA = Path(
    os.environ.get(
        "SCRATCHPATH_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
)
SLIDE = DATA / "slides" / "CMU-1-Small-Region.svs"
TILE = 224
OLD_DEFAULT = "jpeg:90:420"
SETTINGS = [OLD_DEFAULT, "jpeg:95:420", "jpeg:80:444", "jpeg:85:444", "jpeg:90:444",
            "jpeg:95:444", "webp:0", "zstd:3"]  # fmt: skip


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def source_tiles() -> np.ndarray:
    """The stored tiles' source pixels, read with tifffile at their recorded coordinates."""
    with tempfile.TemporaryDirectory() as tmp:
        ingest([SLIDE], Path(tmp) / "s.zarr", mpp=0.5, tile_size=TILE, codec="zstd",
               min_tissue=0.5, progress=False)  # fmt: skip
        store = PatchStore(Path(tmp) / "s.zarr")
        assert set(store.tiles["level"].tolist()) == {0}, "expected level-0 tiles"
        stored = store.read(np.arange(len(store)))
        slide = tifffile.imread(SLIDE, series=0, level=0)[..., :3]
        source = np.stack([
            slide[y : y + TILE, x : x + TILE]
            for x, y in zip(store.tiles["x"].tolist(), store.tiles["y"].tolist(), strict=True)
        ])  # fmt: skip
    assert np.array_equal(stored, source), "lossless store differs from the slide pixels"
    return source


def measure(spec: str, tiles: np.ndarray) -> dict:
    codec = TileCodec.parse(spec, TILE)
    blobs = [codec.encode(t) for t in tiles]
    decoded = [codec.decode(b) for b in blobs]
    start, rounds = time.perf_counter(), 0
    while time.perf_counter() - start < 1.0:
        for blob in blobs:
            codec.decode(blob)
        rounds += 1
    rate = rounds * len(blobs) / (time.perf_counter() - start)
    scores = [psnr(d, t) for d, t in zip(decoded, tiles, strict=True)]
    return {"name": codec.name, "psnr": float(np.mean(scores)), "min_psnr": float(np.min(scores)),
            "bytes": float(np.mean([len(b) for b in blobs])), "rate": rate}  # fmt: skip


def damage_check_cost(tiles: np.ndarray) -> tuple[float, float]:
    """(µs per tile of ``jpeg_damage``, µs per tile of a bare imagecodecs decode), default codec."""
    import imagecodecs

    codec = TileCodec.parse("jpeg", TILE)
    blobs = [codec.encode(t) for t in tiles]
    out = []
    for work in (lambda b: jpeg_damage(b, TILE), imagecodecs.jpeg8_decode):
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for blob in blobs:
                work(blob)
            best = min(best, (time.perf_counter() - start) / len(blobs))
        out.append(best * 1e6)
    return out[0], out[1]


def main() -> None:
    tiles = source_tiles()
    print(f"{SLIDE.name}: {len(tiles)} tissue tiles of {TILE} px at level 0 (source = tifffile)")
    rows = [measure(spec, tiles) for spec in SETTINGS]
    base = rows[0]
    print(f"{'codec':<13} {'PSNR dB':>8} {'min dB':>7} {'bytes/tile':>11} {'x old bytes':>12} "
          f"{'decodes/s':>10} {'x old rate':>11}")  # fmt: skip
    for r in rows:
        print(f"{r['name']:<13} {r['psnr']:8.2f} {r['min_psnr']:7.2f} {r['bytes']:11.0f} "
              f"{r['bytes'] / base['bytes']:12.2f} {r['rate']:10.0f} "
              f"{r['rate'] / base['rate']:11.2f}")  # fmt: skip
    check, bare = damage_check_cost(tiles)
    print(
        f"damage check (jpeg_damage): {check:.1f} µs/tile against a bare decode's {bare:.0f} "
        f"µs: {check / bare:.3f} of it"
    )
    default = next(r for r in rows if r["name"] == TileCodec.parse("jpeg", TILE).name)
    print(f"codecs: default {default['name']} {default['psnr']:.1f} dB (old default {OLD_DEFAULT} "
          f"{base['psnr']:.1f} dB), {default['bytes'] / base['bytes']:.2f} x bytes")  # fmt: skip


if __name__ == "__main__":
    main()
