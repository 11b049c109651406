"""The backend-independent part of a slide: levels, µm/px, white-padded windows, thumbnails."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from scratchpath.errors import ScratchpathError

# Whole-slide suffixes searched for in folders (find_slides); PNG/JPEG only when named.
SLIDE_SUFFIXES = (
    ".svs", ".ome.tif", ".ome.tiff", ".tif", ".tiff", ".ndpi", ".dcm", ".scn", ".bif",
    ".mrxs", ".vms", ".vmu", ".svslide", ".czi",
)  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CACHE_BYTES = 64 * 2**20  # decoded tiles kept per open slide


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in pixels, its downsample and its µm per pixel."""

    index: int
    width: int
    height: int
    downsample: float  # level-0 pixels per pixel of this level
    mpp: float | None  # µm per pixel of this level (None if unknown)


@dataclass(frozen=True)
class JpegTiles:
    """A level stored as a row-major grid of equally sized baseline-JPEG tiles, each of which
    :meth:`Slide.read_jpeg_tile` returns as a complete JPEG stream (for a batched decoder)."""

    tile_height: int
    tile_width: int
    rows: int  # tiles down
    cols: int  # tiles across
    colour: str = "stream"  # "rgb", "ycbcr" (TIFF photometric) or as the stream's markers say


# Adobe APP14 marker with transform 0: "the three components are R, G, B, no colour transform".
# libjpeg-turbo (torchvision on the CPU, imagecodecs) honours it; without it a 3-component
# stream with component ids 0, 1, 2 (Aperio's RGB tiles) is taken for YCbCr.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def complete_jpeg(data: bytes, tables: bytes | None = None, *, rgb: bool = False) -> bytes:
    """A stand-alone JPEG stream from a TIFF tile: the shared ``JPEGTables`` (quantisation and
    Huffman tables, TIFF tag 347) merged in, and an Adobe marker saying "RGB" when the tile's
    components are RGB rather than YCbCr (TIFF photometric RGB)."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream (no SOI marker)")
    body = data[2:]
    if tables:
        if tables[:2] != b"\xff\xd8" or tables[-2:] != b"\xff\xd9":
            raise ValueError("JPEGTables is not an SOI ... EOI table stream")
        body = tables[2:-2] + body
    return b"\xff\xd8" + (_ADOBE_RGB if rgb else b"") + body


def slide_stem(path: Path) -> str:
    """File name without its slide suffix (``a.ome.tif`` -> ``a``): the default slide id."""
    name = path.name
    for suffix in SLIDE_SUFFIXES + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def is_slide_file(path: Path) -> bool:
    """True if the file name has a whole-slide suffix (TIFF family, DICOM, MRXS, ...; not PNG)."""
    return path.name.lower().endswith(SLIDE_SUFFIXES)


def levels_from_sizes(sizes: list[tuple[int, int]], mpp: float) -> list[Level]:
    """Levels from ``(width, height)`` per level (finest first) and the µm/px of level 0."""
    width0, height0 = sizes[0]
    levels = []
    for i, (width, height) in enumerate(sizes):
        downsample = (width0 / width + height0 / height) / 2
        levels.append(Level(i, int(width), int(height), downsample, mpp * downsample))
    return levels


class Slide:
    """An open slide; use as a context manager or call :meth:`close`.

    Attributes: ``path``, ``slide_id`` (file stem), ``vendor`` (the format family:
    ``"aperio"``, ``"hamamatsu"``, ``"dicom"``, ``"ome"``, ``"generic-tiff"``, ``"mirax"``,
    ``"leica"``, ``"image"``, ...), ``backend`` (the library that reads it: ``"tifffile"``,
    ``"wsidicom"``, ``"pydicom"``, ``"openslide"``, ``"pillow"``), ``mpp_source`` (where the
    µm/px came from), ``levels`` (finest first) and ``mpp`` (level 0). Every backend has the
    same methods: :meth:`read_region`, :meth:`read_level`, :meth:`thumbnail`, :meth:`describe`.
    """

    backend = "none"

    def __init__(
        self, path: Path, vendor: str, levels: list[Level], mpp_source: str = "file"
    ) -> None:
        self.path = path
        self.slide_id = slide_stem(path)
        self.vendor = vendor
        self.levels = levels
        self.mpp = levels[0].mpp
        self.mpp_source = mpp_source

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        dims = ", ".join(f"{lv.width}x{lv.height}" for lv in self.levels)
        return (
            f"Slide({str(self.path)!r}, vendor={self.vendor!r}, backend={self.backend!r}, "
            f"mpp={self.mpp}, levels=[{dims}])"
        )

    def close(self) -> None:
        """Release the file handle (idempotent)."""

    def describe(self) -> dict:
        """JSON-ready summary: path, slide id, vendor, backend, µm/px (and its source), levels."""
        return {
            "path": str(self.path),
            "slide_id": self.slide_id,
            "vendor": self.vendor,
            "backend": self.backend,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "levels": [asdict(lv) for lv in self.levels],
        }

    def _check_level(self, level: int) -> Level:
        if not 0 <= level < len(self.levels):
            raise ValueError(f"{self.path}: level {level} out of range 0..{len(self.levels) - 1}")
        return self.levels[level]

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels of a window, ``(height, width, 3)`` uint8 RGB.

        ``x, y, width, height`` are in pixels of ``level``; the part outside the image is white.
        """
        lv = self._check_level(level)
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lv.width), min(y + height, lv.height)
        if x0 < x1 and y0 < y1:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read_inside(level, x0, y0, x1, y1)
        return out

    def _read_inside(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """``(y1 - y0, x1 - x0, 3)`` uint8 pixels of a window that lies inside the level."""
        raise NotImplementedError

    def jpeg_tiles(self, level: int) -> JpegTiles | None:
        """The level's tile grid when every stored tile is a baseline JPEG that
        :meth:`read_jpeg_tile` returns undecoded (``embed`` then decodes them on the device);
        None when the level must be read through :meth:`read_region` (other codecs, NDPI
        stripes, a backend that does not expose its tiles)."""
        return None

    def read_jpeg_tile(self, level: int, index: int) -> bytes | None:
        """Tile ``index`` (row-major) of a level :meth:`jpeg_tiles` describes, as a complete
        JPEG stream; None when the file stores no tile there (it reads as white)."""
        raise NotImplementedError(f"{self.path}: no JPEG tiles exposed by {self.backend}")

    def read_level(self, level: int) -> np.ndarray:
        """The whole level as one array (only sensible for small levels)."""
        lv = self._check_level(level)
        return self.read_region(level, 0, 0, lv.width, lv.height)

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """A low-resolution RGB image of the whole slide, at most ``max_size`` px on its long side.

        Returns ``(rgb, scale)`` where ``scale`` is level-0 pixels per thumbnail pixel. Built from
        the coarsest level at least ``max_size`` px wide or high (never upsampled), read in bands
        so that a large level is never held in memory whole.
        """
        import cv2

        level = next(
            (lv for lv in reversed(self.levels) if max(lv.width, lv.height) >= max_size),
            self.levels[0],
        )
        scale = max(1.0, max(level.width, level.height) / max_size)
        out_w = max(1, round(level.width / scale))
        out_h = max(1, round(level.height / scale))
        factor = max(1, int(scale))  # exact block-mean reduction first, per band
        band = factor * max(1, 1024 // factor)
        parts = []
        for y in range(0, level.height, band):
            rows = self.read_region(level.index, 0, y, level.width, min(band, level.height - y))
            if factor > 1:
                h = rows.shape[0] // factor * factor or rows.shape[0]
                w = rows.shape[1] // factor * factor
                rows = rows[:h, :w]
                rows = cv2.resize(
                    rows, (w // factor, max(1, h // factor)), interpolation=cv2.INTER_AREA
                )
            parts.append(rows)
        reduced = np.concatenate(parts, axis=0)
        thumb = cv2.resize(reduced, (out_w, out_h), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(thumb), self.levels[0].width / out_w


class TileCache:
    """Least-recently-used decoded tiles of one slide, bounded in bytes."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self._tiles: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._tiles)

    def get(
        self, key: tuple[int, int], decode: Callable[[], np.ndarray | None]
    ) -> np.ndarray | None:
        if key in self._tiles:
            self._tiles.move_to_end(key)
            return self._tiles[key]
        tile = decode()
        self._tiles[key] = tile
        self._bytes += 0 if tile is None else tile.nbytes
        while self._bytes > self._max_bytes and len(self._tiles) > 1:
            _, old = self._tiles.popitem(last=False)
            self._bytes -= 0 if old is None else old.nbytes
        return tile

    def clear(self) -> None:
        self._tiles.clear()
        self._bytes = 0


def fill_from_tiles(
    out: np.ndarray,
    window: tuple[int, int, int, int],
    tile_shape: tuple[int, int],
    grid: tuple[int, int],
    tile: Callable[[int], np.ndarray | None],
) -> None:
    """Copy into ``out`` the parts of a tile grid that the window ``(x0, y0, x1, y1)`` covers.

    ``tile_shape`` is ``(tile_h, tile_w)``, ``grid`` ``(tiles down, tiles across)``, and
    ``tile(index)`` returns the decoded row-major tile ``index`` (or None when not stored, which
    leaves ``out`` as it is). Only the tiles that the window touches are asked for.
    """
    x0, y0, x1, y1 = window
    tile_h, tile_w = tile_shape
    n_down, n_across = grid
    for ty in range(y0 // tile_h, min((y1 - 1) // tile_h + 1, n_down)):
        for tx in range(x0 // tile_w, min((x1 - 1) // tile_w + 1, n_across)):
            segment = tile(ty * n_across + tx)
            if segment is None:
                continue
            sy0, sx0 = ty * tile_h, tx * tile_w
            iy0, iy1 = max(y0, sy0), min(y1, sy0 + segment.shape[0])
            ix0, ix1 = max(x0, sx0), min(x1, sx0 + segment.shape[1])
            if iy0 < iy1 and ix0 < ix1:
                out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = segment[
                    iy0 - sy0 : iy1 - sy0, ix0 - sx0 : ix1 - sx0
                ]


def require_assumed(path: Path, assume_mpp: float | None) -> float:
    """``assume_mpp`` for a slide that records no µm/px; a one-line error when it is missing."""
    if assume_mpp is None:
        raise ScratchpathError(
            f"{path}: no µm/px recorded in the file; pass assume_mpp (--assume-mpp) to set it"
        )
    if not assume_mpp > 0:
        raise ScratchpathError(f"assume_mpp: must be > 0, got {assume_mpp}")
    return float(assume_mpp)


def valid_mpp(value: float | None) -> float | None:
    """``value`` if it is a plausible microscope µm/px, else None."""
    # Some writers store placeholder resolutions (1 px/inch, 72 dpi): not a microscope scale.
    return value if value is not None and 0.01 <= value <= 100.0 else None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def level_for_mpp(slide: Slide, target_mpp: float, tolerance: float = 0.05) -> Level:
    """The coarsest level whose µm/px is at most ``target_mpp`` (within ``tolerance``).

    Reading that level and downsampling never upsamples. Raises ScratchpathError if even
    level 0 is coarser than the target (beyond the tolerance).
    """
    if slide.mpp is None:
        raise ScratchpathError(f"{slide.path}: no µm/px known")
    candidates = [lv for lv in slide.levels if lv.mpp <= target_mpp * (1 + tolerance)]
    if not candidates:
        raise ScratchpathError(
            f"{slide.path}: finest level is {slide.mpp:.3g} µm/px, coarser than the target "
            f"{target_mpp:g} µm/px (would need upsampling)"
        )
    return max(candidates, key=lambda lv: lv.mpp)


def native_within(level: Level, target_mpp: float, tolerance: float = 0.05) -> bool:
    """True if ``level`` is close enough to ``target_mpp`` to be cut without resampling."""
    return level.mpp is not None and abs(level.mpp / target_mpp - 1.0) <= tolerance
