"""TIFF-family slides read tile by tile with tifffile + imagecodecs, and PNG/JPEG images.

Read here: Aperio SVS (JPEG and JPEG 2000 / compression 33005 tiles), Hamamatsu NDPI (its
JPEG restart-marker stripes, as tifffile exposes them), plain tiled pyramidal TIFF (one page per
level, reduced levels marked NewSubfileType), OME-TIFF with SubIFD pyramids and other TIFF
slides that tifffile exposes as a pyramid series; PNG/JPEG images as one-level "slides".

µm per pixel of level 0 comes from, in order: the Aperio description (``MPP = 0.499``), OME
``PhysicalSizeX/Y``, TIFF ``X/YResolution`` with ``ResolutionUnit`` centimetre or inch (NDPI
records it there); lower levels scale it by their downsample.

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
from pathlib import Path

import numpy as np

from scratchpath.errors import ScratchpathError
from scratchpath.slides.base import (
    JpegTiles,
    Level,
    Slide,
    TileCache,
    complete_jpeg,
    fill_from_tiles,
    first_line,
    levels_from_sizes,
    require_assumed,
    valid_mpp,
)

_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}
_RESOLUTION_UNIT_UM = {2: 25400.0, 3: 10000.0}  # ResolutionUnit INCH, CENTIMETER -> µm per unit


class TiffSlide(Slide):
    """A TIFF-family slide read tile by tile with tifffile."""

    backend = "tifffile"

    def __init__(
        self, path: Path, tiff, pages: list, vendor: str, levels: list[Level], mpp_source: str
    ) -> None:
        super().__init__(path, vendor, levels, mpp_source)
        self._tiff = tiff
        self._pages = pages
        self._cache = TileCache()

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None
            self._cache.clear()

    def _segment_bytes(self, level: int, index: int) -> bytes | None:
        """The stored bytes of tile/strip ``index`` of a level; None if not stored."""
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
        return data

    def jpeg_tiles(self, level: int) -> JpegTiles | None:
        page = self._pages[self._check_level(level).index]
        if (
            page.compression != 7  # JPEG (not JPEG 2000, LZW, ...)
            or not page.is_tiled
            or self._tiff.is_ndpi  # NDPI: restart-marker stripes of one huge JPEG
            or page.photometric not in (2, 6)  # RGB or YCbCr
            or page.samplesperpixel != 3
            or page.bitspersample != 8
        ):
            return None
        colour = "rgb" if page.photometric == 2 else "ycbcr"
        return JpegTiles(page.chunks[0], page.chunks[1], page.chunked[0], page.chunked[1], colour)

    def read_jpeg_tile(self, level: int, index: int) -> bytes | None:
        if self._tiff is None:
            raise ValueError(f"{self.path}: slide is closed")
        data = self._segment_bytes(level, index)
        if data is None:
            return None
        page = self._pages[level]
        try:
            return complete_jpeg(data, page.jpegtables, rgb=page.photometric == 2)
        except ValueError as err:
            raise ScratchpathError(f"{self.path}: tile {index} of level {level}: {err}") from None

    def _decode_segment(self, level: int, index: int) -> np.ndarray | None:
        """Decoded tile/strip ``index`` of a level, ``(h, w, 3)``; None if not stored."""
        page = self._pages[level]
        data = self._segment_bytes(level, index)
        if data is None:
            return None
        try:
            segment, _, _ = page.decode(
                data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader
            )
        except Exception as err:  # imagecodecs raises many types for damaged data
            raise ScratchpathError(
                f"{self.path}: cannot decode tile {index} of level {level} ({first_line(err)})"
            ) from err
        return segment.reshape(segment.shape[-3:])[..., :3]

    def _read_inside(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if self._tiff is None:
            raise ValueError(f"{self.path}: slide is closed")
        out = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
        page = self._pages[level]
        fill_from_tiles(
            out,
            (x0, y0, x1, y1),
            (page.chunks[0], page.chunks[1]),
            (page.chunked[0], page.chunked[1]),
            lambda i: self._cache.get((level, i), lambda: self._decode_segment(level, i)),
        )
        return out


class ImageSlide(Slide):
    """A plain PNG/JPEG image held in memory as a one-level slide."""

    backend = "pillow"

    def __init__(self, path: Path, rgb: np.ndarray, mpp: float) -> None:
        h, w = rgb.shape[:2]
        super().__init__(path, "image", [Level(0, w, h, 1.0, mpp)], "assumed")
        self._rgb = rgb

    def _read_inside(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self._rgb[y0:y1, x0:x1]


def open_image(path: Path, assume_mpp: float | None) -> ImageSlide:
    """A PNG/JPEG image as a one-level slide at ``assume_mpp`` (required)."""
    mpp = require_assumed(path, assume_mpp)
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except Exception as err:
        raise ScratchpathError(f"{path}: unreadable image ({first_line(err)})") from err
    return ImageSlide(path, rgb, mpp)


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


class UnsupportedLayoutError(ScratchpathError):
    """A readable TIFF whose pixel layout tifffile's path here does not handle (try OpenSlide)."""


def open_tiff(path: Path, assume_mpp: float | None) -> TiffSlide:
    """Open a TIFF-family slide with tifffile; ScratchpathError naming the file otherwise."""
    import tifffile

    quiet = _DropWarnings()  # a damaged file gets our one-line error, not tifffile's warnings
    logger = logging.getLogger("tifffile")
    logger.addFilter(quiet)
    try:
        tiff = tifffile.TiffFile(path)
    except Exception as err:
        logger.removeFilter(quiet)
        raise ScratchpathError(f"{path}: unreadable TIFF ({first_line(err)})") from err
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
            raise UnsupportedLayoutError(
                f"{path}: not an 8-bit RGB slide (axes {series.axes}, dtype {first.dtype}, "
                f"{first.samplesperpixel} samples per pixel)"
            )
        if first.planarconfig != 1:
            raise UnsupportedLayoutError(f"{path}: planar (separate-channel) RGB is not supported")
        size = tiff.filehandle.size
        for page in pages:
            ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts)
            if ends.size and int(ends.max()) > size:
                raise ScratchpathError(f"{path}: truncated file (tile data past end of file)")

        if tiff.is_svs:
            vendor, mpp, source = "aperio", _svs_mpp(first.description), "Aperio MPP"
        elif tiff.is_ome:
            vendor, mpp, source = "ome", _ome_mpp(tiff.ome_metadata or ""), "OME PhysicalSizeX/Y"
        else:
            vendor = "hamamatsu" if tiff.is_ndpi else "generic-tiff"
            mpp, source = None, ""
        if valid_mpp(mpp) is None:
            mpp, source = _resolution_mpp(first), "TIFF XResolution"
        mpp = valid_mpp(mpp)
        if mpp is None:
            mpp, source = require_assumed(path, assume_mpp), "assumed"
        levels = levels_from_sizes([(p.imagewidth, p.imagelength) for p in pages], mpp)
        return TiffSlide(path, tiff, pages, vendor, levels, source)
    except ScratchpathError:
        tiff.close()
        raise
    except Exception as err:  # tifffile parses damaged directories lazily
        tiff.close()
        raise ScratchpathError(f"{path}: damaged TIFF ({first_line(err)})") from err


class _DropWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR
