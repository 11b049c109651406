"""Whole-slide images: levels, µm per pixel and region reads, with tifffile + imagecodecs.

Supported: Aperio SVS (JPEG and JPEG 2000 / compression 33005 tiles), plain tiled pyramidal
TIFF (one page per level, reduced levels marked NewSubfileType), OME-TIFF with SubIFD pyramids,
other TIFF-family slides tifffile exposes as a pyramid series (e.g. NDPI), and plain PNG/JPEG
images as single-level "slides" (handy for small regions; they need ``assume_mpp``).

µm per pixel of level 0 comes from, in order: the Aperio description (``MPP = 0.499``), OME
``PhysicalSizeX/Y``, TIFF ``X/YResolution`` with ``ResolutionUnit`` centimetre or inch; lower
levels scale it by their downsample. A slide with none is refused unless ``assume_mpp`` is given.

``read_region`` decodes only the TIFF tiles (or strips) that the window touches, straight from
``page.dataoffsets`` with ``page.decode``, and keeps recently decoded tiles in a small LRU cache
so that neighbouring windows don't decode them twice. On the tile windows of an ingest run this
is about 3× faster than slicing tifffile's zarr store (``series.aszarr()``), which re-decodes
shared tiles; ``benchmarks/bench_ingest.py`` prints both.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from scratchpath.errors import ScratchpathError

SLIDE_SUFFIXES = (".svs", ".ome.tif", ".ome.tiff", ".tif", ".tiff", ".ndpi", ".scn", ".bif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}
_RESOLUTION_UNIT_UM = {2: 25400.0, 3: 10000.0}  # ResolutionUnit INCH, CENTIMETER -> µm per unit
_CACHE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in pixels, its downsample and its µm per pixel."""

    index: int
    width: int
    height: int
    downsample: float  # level-0 pixels per pixel of this level
    mpp: float | None  # µm per pixel of this level (None if unknown)


def slide_stem(path: Path) -> str:
    """File name without its slide suffix (``a.ome.tif`` -> ``a``): the default slide id."""
    name = path.name
    for suffix in SLIDE_SUFFIXES + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def is_slide_file(path: Path) -> bool:
    """True if the file name has a whole-slide suffix (TIFF family; not PNG/JPEG)."""
    return path.name.lower().endswith(SLIDE_SUFFIXES)


class Slide:
    """An open slide; use as a context manager or call :meth:`close`.

    Attributes: ``path``, ``slide_id`` (file stem), ``vendor`` (``"aperio"``, ``"ome"``,
    ``"generic-tiff"``, ``"image"``, ...), ``levels`` (finest first) and ``mpp`` (level 0).
    """

    def __init__(self, path: Path, vendor: str, levels: list[Level]) -> None:
        self.path = path
        self.slide_id = slide_stem(path)
        self.vendor = vendor
        self.levels = levels
        self.mpp = levels[0].mpp

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        dims = ", ".join(f"{lv.width}x{lv.height}" for lv in self.levels)
        return f"Slide({str(self.path)!r}, vendor={self.vendor!r}, mpp={self.mpp}, levels=[{dims}])"

    def close(self) -> None:
        """Release the file handle (idempotent)."""

    def _check_level(self, level: int) -> Level:
        if not 0 <= level < len(self.levels):
            raise ValueError(f"{self.path}: level {level} out of range 0..{len(self.levels) - 1}")
        return self.levels[level]

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels of a window, ``(height, width, 3)`` uint8 RGB.

        ``x, y, width, height`` are in pixels of ``level``; the part outside the image is white.
        """
        raise NotImplementedError

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


class TiffSlide(Slide):
    """A TIFF-family slide read tile by tile with tifffile."""

    def __init__(self, path: Path, tiff, pages: list, vendor: str, levels: list[Level]) -> None:
        super().__init__(path, vendor, levels)
        self._tiff = tiff
        self._pages = pages
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None
            self._cache.clear()

    def _segment(self, level: int, index: int) -> np.ndarray | None:
        """Decoded tile/strip ``index`` of a level, ``(h, w, samples)``; None if not stored."""
        key = (level, index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        page = self._pages[level]
        offset, nbytes = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if nbytes == 0 or offset == 0:
            return None
        fh = self._tiff.filehandle
        with fh.lock:
            fh.seek(offset)
            data = fh.read(nbytes)
        if len(data) != nbytes:
            raise ScratchpathError(f"{self.path}: truncated file (tile {index} of level {level})")
        try:
            segment, _, _ = page.decode(
                data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader
            )
        except Exception as err:  # imagecodecs raises many types for damaged data
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ScratchpathError(
                f"{self.path}: cannot decode tile {index} of level {level} ({msg})"
            ) from err
        segment = segment.reshape(segment.shape[-3:])[..., :3]
        self._cache[key] = segment
        self._cache_bytes += segment.nbytes
        while self._cache_bytes > _CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return segment

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        lv = self._check_level(level)
        if self._tiff is None:
            raise ValueError(f"{self.path}: slide is closed")
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        page = self._pages[level]
        seg_h, seg_w = page.chunks[0], page.chunks[1]
        n_down, n_across = page.chunked[0], page.chunked[1]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lv.width), min(y + height, lv.height)
        if x0 >= x1 or y0 >= y1:
            return out
        for ty in range(y0 // seg_h, min((y1 - 1) // seg_h + 1, n_down)):
            for tx in range(x0 // seg_w, min((x1 - 1) // seg_w + 1, n_across)):
                segment = self._segment(level, ty * n_across + tx)
                if segment is None:
                    continue
                # Intersection of the window with this segment, in level pixels.
                sy0, sx0 = ty * seg_h, tx * seg_w
                iy0, iy1 = max(y0, sy0), min(y1, sy0 + segment.shape[0])
                ix0, ix1 = max(x0, sx0), min(x1, sx0 + segment.shape[1])
                if iy0 >= iy1 or ix0 >= ix1:
                    continue
                out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = segment[
                    iy0 - sy0 : iy1 - sy0, ix0 - sx0 : ix1 - sx0
                ]
        return out


class ImageSlide(Slide):
    """A plain PNG/JPEG image held in memory as a one-level slide."""

    def __init__(self, path: Path, rgb: np.ndarray, mpp: float) -> None:
        h, w = rgb.shape[:2]
        super().__init__(path, "image", [Level(0, w, h, 1.0, mpp)])
        self._rgb = rgb

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        lv = self._check_level(level)
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lv.width), min(y + height, lv.height)
        if x0 < x1 and y0 < y1:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._rgb[y0:y1, x0:x1]
        return out


def _svs_mpp(description: str) -> float | None:
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    return float(match.group(1)) if match else None


def _ome_mpp(ome_xml: str) -> float | None:
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels")), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    sizes = []
    for axis in ("X", "Y"):
        value = pixels.attrib.get(f"PhysicalSize{axis}")
        unit = pixels.attrib.get(f"PhysicalSize{axis}Unit", "µm")
        if value is not None and unit in _OME_UNITS_UM:
            sizes.append(float(value) * _OME_UNITS_UM[unit])
    return sum(sizes) / len(sizes) if sizes else None


def _resolution_mpp(page) -> float | None:
    unit_tag, res_tag = page.tags.get("ResolutionUnit"), page.tags.get("XResolution")
    if unit_tag is None or res_tag is None:
        return None
    um_per_unit = _RESOLUTION_UNIT_UM.get(int(unit_tag.value))
    numerator, denominator = res_tag.value
    if um_per_unit is None or numerator <= 0 or denominator <= 0:
        return None
    return um_per_unit * denominator / numerator


def _valid_mpp(value: float | None) -> float | None:
    # Some writers store placeholder resolutions (1 px/inch, 72 dpi): not a microscope scale.
    return value if value is not None and 0.01 <= value <= 100.0 else None


def _open_tiff(path: Path, assume_mpp: float | None) -> TiffSlide:
    import tifffile

    quiet = _DropWarnings()  # a damaged file gets our one-line error, not tifffile's warnings
    logger = logging.getLogger("tifffile")
    logger.addFilter(quiet)
    try:
        tiff = tifffile.TiffFile(path)
    except Exception as err:
        logger.removeFilter(quiet)
        raise ScratchpathError(f"{path}: unreadable TIFF ({_first_line(err)})") from err
    try:
        try:
            series = tiff.series
        finally:
            logger.removeFilter(quiet)
        if not series or not len(tiff.pages):
            raise ScratchpathError(f"{path}: truncated or damaged TIFF (no readable image)")
        series = series[0]
        pages = []
        for level in series.levels:
            page = level.pages[0]
            pages.append(page.aspage() if hasattr(page, "aspage") else page)
        first = pages[0]
        if first.dtype != np.uint8 or first.samplesperpixel not in (3, 4) or first.imagedepth > 1:
            raise ScratchpathError(
                f"{path}: not an 8-bit RGB slide (axes {series.axes}, dtype {first.dtype}, "
                f"{first.samplesperpixel} samples per pixel)"
            )
        if first.planarconfig != 1:
            raise ScratchpathError(f"{path}: planar (separate-channel) RGB is not supported")
        size = tiff.filehandle.size
        for page in pages:
            ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts)
            if ends.size and int(ends.max()) > size:
                raise ScratchpathError(f"{path}: truncated file (tile data past end of file)")

        if tiff.is_svs:
            vendor, mpp = "aperio", _svs_mpp(first.description)
        elif tiff.is_ome:
            vendor, mpp = "ome", _ome_mpp(tiff.ome_metadata or "")
        else:
            vendor = "hamamatsu" if tiff.is_ndpi else "generic-tiff"
            mpp = None
        mpp = _valid_mpp(mpp) or _valid_mpp(_resolution_mpp(first))
        if mpp is None:
            mpp = _require_assumed(path, assume_mpp)
        width0, height0 = first.imagewidth, first.imagelength
        levels = []
        for i, page in enumerate(pages):
            downsample = (width0 / page.imagewidth + height0 / page.imagelength) / 2
            levels.append(Level(i, page.imagewidth, page.imagelength, downsample, mpp * downsample))
        return TiffSlide(path, tiff, pages, vendor, levels)
    except ScratchpathError:
        tiff.close()
        raise
    except Exception as err:  # tifffile parses damaged directories lazily
        tiff.close()
        raise ScratchpathError(f"{path}: damaged TIFF ({_first_line(err)})") from err


class _DropWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _require_assumed(path: Path, assume_mpp: float | None) -> float:
    if assume_mpp is None:
        raise ScratchpathError(
            f"{path}: no µm/px recorded in the file; pass assume_mpp (--assume-mpp) to set it"
        )
    if not assume_mpp > 0:
        raise ScratchpathError(f"assume_mpp: must be > 0, got {assume_mpp}")
    return float(assume_mpp)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def open_slide(path: str | Path, assume_mpp: float | None = None) -> Slide:
    """Open a slide (SVS, pyramidal TIFF, OME-TIFF, ...) or a PNG/JPEG image.

    Args:
        path: the file.
        assume_mpp: µm per pixel of level 0 to use when the file records none (required for
            PNG/JPEG); a value recorded in the file always wins.

    Raises:
        ScratchpathError: ``"<path>: <reason>"`` for a missing, empty, non-image, truncated or
            unsupported file, or one without µm/px and no ``assume_mpp``.
    """
    path = Path(path)
    if not path.exists():
        raise ScratchpathError(f"{path}: no such file")
    if not path.is_file():
        raise ScratchpathError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ScratchpathError(f"{path}: empty file")
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic[:4] in _TIFF_MAGIC:
        return _open_tiff(path, assume_mpp)
    if magic.startswith(b"\x89PNG") or magic.startswith(b"\xff\xd8\xff"):
        mpp = _require_assumed(path, assume_mpp)
        from PIL import Image

        try:
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"))
        except Exception as err:
            raise ScratchpathError(f"{path}: unreadable image ({_first_line(err)})") from err
        return ImageSlide(path, rgb, mpp)
    raise ScratchpathError(f"{path}: not a TIFF, PNG or JPEG file")


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
