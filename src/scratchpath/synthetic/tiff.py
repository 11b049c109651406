"""Writing synthetic slides as scanner-like pyramidal TIFFs, tile row by tile row, and labelled
tile sets for evaluation."""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from scratchpath.files import atomic_write
from scratchpath.synthetic.render import TISSUE_TYPES, SyntheticSlide

_TILE = 256
_BLOCK_WIDTH = 2048  # px rendered per call: big enough to amortise, small enough for the cache
# tifffile gathers this many bytes of tiles per (threaded) compression pass; its default
# (512 MB) would dominate the writer's memory.
_WRITE_BUFFER = 16 * 2**20


def pyramid_shapes(width: int, height: int, min_size: int = 512) -> list[tuple[int, int]]:
    """(height, width) of each level: halved until the longer side is ≤ ``min_size``."""
    shapes = [(height, width)]
    while max(shapes[-1]) > min_size:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def write_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    *,
    mpp: float = 0.5,
    tissue: str = "mixed",
    seed: int = 0,
    compression: str = "jpeg",
    quality: int = 90,
    slide: SyntheticSlide | None = None,
) -> Path:
    """Write a synthetic slide as a pyramidal, 256×256-tiled TIFF, like a scanner would.

    Level 0 is rendered one row of tiles at a time and streamed to tifffile; each reduced level
    (×2 area average of the one above) is staged in a temporary raw file beside
    ``path``, so memory stays at a few tile rows whatever the slide size. A ``.ome.tif`` path
    gets an OME-TIFF with the levels as SubIFDs and ``PhysicalSizeX/Y``; any other name a plain
    TIFF with one page per level (reduced levels marked NewSubfileType=1). Every level carries
    its µm/px in X/YResolution (pixels per cm). The file appears atomically (temp + rename).

    Args:
        compression: ``"jpeg"`` (quality ``quality``, the scanners' usual) or ``"zstd"`` (lossless).
        slide: render this slide (e.g. a :class:`~scratchpath.synthetic.CohortSlide`) instead
            of ``SyntheticSlide(width, height, mpp=mpp, tissue=tissue, seed=seed)``.
    """
    path = Path(path)
    if compression not in ("jpeg", "zstd"):
        raise ValueError(f"compression: {compression!r} is not 'jpeg' or 'zstd'")
    import tifffile

    if slide is None:
        slide = SyntheticSlide(width, height, mpp=mpp, tissue=tissue, seed=seed)
    elif (slide.width, slide.height, slide.mpp) != (width, height, mpp):
        raise ValueError(f"slide: {slide.width}x{slide.height} @ {slide.mpp}, not the size given")
    shapes = pyramid_shapes(width, height)
    ome = path.name.lower().endswith((".ome.tif", ".ome.tiff"))
    codec = {"compression": "jpeg", "compressionargs": {"level": quality}}
    if compression == "zstd":
        codec = {"compression": "zstd", "predictor": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with (
        tempfile.TemporaryDirectory(dir=path.parent, prefix=".synth-") as stage,
        contextlib.ExitStack() as staged,
    ):
        levels = [
            staged.enter_context(_StagedLevel(Path(stage) / f"level{k}.rgb", *hw))
            for k, hw in enumerate(shapes[1:], start=1)
        ]
        sources = [_rendered_tiles(slide, levels[0] if levels else None)]
        sources += [_stored_tiles(levels[k], levels[k + 1] if k + 1 < len(levels) else None)
                    for k in range(len(levels))]  # fmt: skip
        bigtiff = width * height * 3 > 2**31
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=ome) as tif:
            for k, ((h, w), tiles) in enumerate(zip(shapes, sources, strict=True)):
                level_mpp = mpp * width / w
                options = dict(
                    shape=(h, w, 3), dtype=np.uint8, tile=(_TILE, _TILE), photometric="rgb",
                    resolution=(1e4 / level_mpp, 1e4 / level_mpp), resolutionunit="CENTIMETER",
                    software="scratchpath.synthetic", buffersize=_WRITE_BUFFER, **codec,
                )  # fmt: skip
                if k == 0:
                    if ome:
                        options["subifds"] = len(shapes) - 1
                        options["metadata"] = {
                            "axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
                            "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm",
                            "Name": f"synthetic {tissue} seed={seed}",
                        }  # fmt: skip
                    else:
                        options["description"] = (
                            f"scratchpath synthetic H&E|tissue={tissue}|seed={seed}|MPP={mpp}"
                        )
                        options["metadata"] = None
                else:
                    options["subfiletype"] = 1  # reduced-resolution image
                    options["metadata"] = None
                tif.write(tiles, **options)
        os.replace(tmp, path)
    return path


def _tiles_of_row(row: np.ndarray) -> Iterator[np.ndarray]:
    for x in range(0, row.shape[1], _TILE):
        yield row[:, x : x + _TILE]


class _StagedLevel:
    """A reduced level staged in a raw file, written and read in whole rows with plain file
    I/O: unlike a memory map, its pages never count towards the process's resident memory."""

    def __init__(self, path: Path, height: int, width: int) -> None:
        self.shape = (height, width, 3)
        self._row_bytes = width * 3
        self._file = open(path, "w+b")  # noqa: SIM115 (closed by __exit__)
        self._file.truncate(height * self._row_bytes)

    def __enter__(self) -> _StagedLevel:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def write_rows(self, y: int, rows: np.ndarray) -> None:
        self._file.seek(y * self._row_bytes)
        self._file.write(np.ascontiguousarray(rows).data)

    def read_rows(self, y: int, n: int) -> np.ndarray:
        n = min(n, self.shape[0] - y)
        rows = np.empty((n, *self.shape[1:]), np.uint8)
        self._file.seek(y * self._row_bytes)
        self._file.readinto(rows.data)
        return rows


def _halve_into(row: np.ndarray, y: int, target: _StagedLevel | None) -> None:
    """Area-average a band 2× into rows ``y // 2 ...`` of the next level (edge rows padded)."""
    if target is None:
        return
    h, w = row.shape[:2]
    if h % 2 or w % 2:
        row = np.pad(row, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    half = cv2.resize(row, (row.shape[1] // 2, row.shape[0] // 2), interpolation=cv2.INTER_AREA)
    target.write_rows(y // 2, half[: target.shape[0] - y // 2, : target.shape[1]])


def _rendered_tiles(slide: SyntheticSlide, next_level: _StagedLevel | None) -> Iterator[np.ndarray]:
    """Level-0 tiles in TIFF order (row-major), rendered one tile row at a time."""
    for y in range(0, slide.height, _TILE):
        h = min(_TILE, slide.height - y)
        row = np.empty((h, slide.width, 3), np.uint8)
        for x in range(0, slide.width, _BLOCK_WIDTH):
            w = min(_BLOCK_WIDTH, slide.width - x)
            row[:, x : x + w] = slide.render(x, y, w, h)
        _halve_into(row, y, next_level)
        yield from _tiles_of_row(row)


def _stored_tiles(level: _StagedLevel, next_level: _StagedLevel | None) -> Iterator[np.ndarray]:
    """Tiles of a staged level, also filling the next level."""
    for y in range(0, level.shape[0], _TILE):
        row = level.read_rows(y, _TILE)
        _halve_into(row, y, next_level)
        yield from _tiles_of_row(row)


# ----------------------------------------------------------------------------- labelled tiles
def write_tile_set(
    out_dir: str | os.PathLike,
    n_per_class: int,
    size: int = 224,
    seed: int = 0,
    *,
    mpp: float = 0.5,
    tiles_per_group: int = 8,
) -> Path:
    """Labelled tiles, one folder per tissue type, plus ``labels.csv`` (path,label,group).

    Tiles of one *group* come from one synthetic slide (own stain profile and cells), so a
    grouped split keeps near-identical neighbours out of the test set, like patient-level
    splits do; stain profiles are drawn independently of the class, so a probe has to use
    morphology. Returns the path of ``labels.csv``.
    """
    out = Path(out_dir)
    rows = []
    for label, name in enumerate(TISSUE_TYPES):
        (out / name).mkdir(parents=True, exist_ok=True)
        for first in range(0, n_per_class, tiles_per_group):
            group_seed = int(np.random.default_rng([seed, label, first]).integers(2**31))
            group = f"{name}_{first // tiles_per_group:03d}"
            extent = size * 16
            slide = SyntheticSlide(extent, extent, mpp=mpp, tissue=name, seed=group_seed,
                                   outline=False)  # fmt: skip
            rng = np.random.default_rng(group_seed)
            for i in range(first, min(first + tiles_per_group, n_per_class)):
                # Like a curated dataset, a glandular tile must show a gland (a lumen), not
                # only the stroma between glands.
                for _ in range(50):
                    x, y = (int(v) for v in rng.integers(0, extent - size, 2))
                    tile = slide.render(x, y, size, size)
                    if name != "glandular" or (tile.mean(-1) > 215).mean() > 0.02:
                        break
                rel = f"{name}/{name}_{i:05d}.png"
                cv2.imwrite(str(out / rel), cv2.cvtColor(tile, cv2.COLOR_RGB2BGR))
                rows.append({"path": rel, "label": name, "group": group, "x": x, "y": y,
                             "seed": group_seed, "mpp": mpp})  # fmt: skip
    labels = out / "labels.csv"
    with atomic_write(labels) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return labels
