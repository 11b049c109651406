"""DICOM whole-slide images (VL Whole Slide Microscopy Image Storage).

Conformant files and folders (one instance per pyramid level, as scanners and PACS export them)
are read with ``wsidicom``. µm/px comes from the Pixel Spacing of the Pixel Measures functional
group, as DICOM defines it; nothing else in a DICOM file gives the scale reliably.

Some converters (e.g. pydicom-based ones) write single-instance files that ``wsidicom`` refuses:
no Image Type, or no Shared Functional Groups. Those are read by a small fallback on ``pydicom``
(backend ``"pydicom"``): one TILED_FULL instance, its frames located once from the item headers
of the encapsulated Pixel Data (no pixel data is read to open it) and decoded with imagecodecs
only when a window touches them. The JPEG stream's own colour space (JFIF/Adobe markers) decides
the colour conversion, which is also what pydicom's own decoders do.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np

from scratchpath.errors import ScratchpathError
from scratchpath.slides.base import (
    JpegTiles,
    Slide,
    TileCache,
    fill_from_tiles,
    first_line,
    levels_from_sizes,
    require_assumed,
    valid_mpp,
)

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"  # 8-bit lossy: what batched JPEG decoders take
_JPEG = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
         "1.2.840.10008.1.2.4.70"}  # fmt: skip
_JPEG2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
             "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}  # fmt: skip
_JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
_NATIVE = {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2"}  # explicit / implicit VR little endian


def is_dicom(magic: bytes) -> bool:
    """True for the first 132 bytes of a DICOM Part 10 file (preamble + ``DICM``)."""
    return len(magic) >= 132 and magic[128:132] == b"DICM"


class WsiDicomSlide(Slide):
    """A DICOM WSI pyramid read with ``wsidicom``."""

    backend = "wsidicom"

    def __init__(self, path: Path, wsi, mpp: float, mpp_source: str) -> None:
        self._wsi = wsi
        self._wsi_levels = list(wsi.levels)
        sizes = [(lv.size.width, lv.size.height) for lv in self._wsi_levels]
        super().__init__(path, "dicom", levels_from_sizes(sizes, mpp), mpp_source)

    def close(self) -> None:
        if self._wsi is not None:
            self._wsi.close()
            self._wsi = None

    def jpeg_tiles(self, level: int) -> JpegTiles | None:
        self._check_level(level)
        wsi_level = self._wsi_levels[level]
        data = wsi_level.default_instance.image_data
        if (
            str(data.transfer_syntax) != _JPEG_BASELINE
            or data.samples_per_pixel != 3
            or len(wsi_level.focal_planes) != 1
            or len(wsi_level.optical_paths) != 1
        ):
            return None
        tile, grid = wsi_level.tile_size, wsi_level.tiled_size
        return JpegTiles(tile.height, tile.width, grid.height, grid.width)

    def read_jpeg_tile(self, level: int, index: int) -> bytes | None:
        if self._wsi is None:
            raise ValueError(f"{self.path}: slide is closed")
        cols = self._wsi_levels[level].tiled_size.width
        row, col = divmod(index, cols)
        # a tile missing from a sparse level comes back as wsidicom's encoded blank tile
        return self._wsi.read_encoded_tile(
            self._wsi_levels[level].level, (col, row), crop_to_image_boundary=False
        )

    def _read_inside(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if self._wsi is None:
            raise ValueError(f"{self.path}: slide is closed")
        image = self._wsi.read_region((x0, y0), self._wsi_levels[level].level, (x1 - x0, y1 - y0))
        return np.asarray(image.convert("RGB"))


class PydicomSlide(Slide):
    """One TILED_FULL DICOM WSI instance, frames decoded on demand (the fallback reader)."""

    backend = "pydicom"

    def __init__(self, path: Path, meta, frames: list[tuple[int, int]], mpp, source) -> None:
        width, height = int(meta.TotalPixelMatrixColumns), int(meta.TotalPixelMatrixRows)
        super().__init__(path, "dicom", levels_from_sizes([(width, height)], mpp), source)
        self._fh = open(path, "rb")  # noqa: SIM115 - held open until close()
        self._frames = frames  # (offset, length) of each frame's encoded bytes
        self._tile = (int(meta.Rows), int(meta.Columns))
        self._grid = (-(-height // self._tile[0]), -(-width // self._tile[1]))
        self._syntax = str(meta.file_meta.TransferSyntaxUID)
        self._cache = TileCache()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            self._cache.clear()

    def _frame_bytes(self, index: int) -> bytes:
        offset, length = self._frames[index]
        self._fh.seek(offset)
        data = self._fh.read(length)
        if len(data) != length:
            raise ScratchpathError(f"{self.path}: truncated file (frame {index})")
        return data

    def jpeg_tiles(self, level: int) -> JpegTiles | None:
        self._check_level(level)
        if self._syntax != _JPEG_BASELINE:
            return None
        return JpegTiles(*self._tile, *self._grid)

    def read_jpeg_tile(self, level: int, index: int) -> bytes | None:
        # A frame is a complete JPEG stream; its own markers (JFIF, Adobe) say its colour space,
        # as they do for the CPU decoder in _decode_frame.
        if self._fh is None:
            raise ValueError(f"{self.path}: slide is closed")
        return self._frame_bytes(index)

    def _decode_frame(self, index: int) -> np.ndarray:
        import imagecodecs

        data = self._frame_bytes(index)
        try:
            if self._syntax in _NATIVE:
                frame = np.frombuffer(data, np.uint8).reshape(*self._tile, 3)
            elif self._syntax in _JPEG:
                frame = imagecodecs.jpeg_decode(data)
            elif self._syntax in _JPEG2000:
                frame = imagecodecs.jpeg2k_decode(data)
            else:
                frame = imagecodecs.jpegls_decode(data)
        except Exception as err:  # imagecodecs raises many types for damaged data
            raise ScratchpathError(
                f"{self.path}: cannot decode frame {index} ({first_line(err)})"
            ) from err
        if frame.ndim != 3 or frame.shape[2] < 3:
            raise ScratchpathError(f"{self.path}: frame {index} is not RGB ({frame.shape})")
        return frame[..., :3]

    def _read_inside(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if self._fh is None:
            raise ValueError(f"{self.path}: slide is closed")
        out = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
        fill_from_tiles(
            out,
            (x0, y0, x1, y1),
            self._tile,
            self._grid,
            lambda i: self._cache.get((0, i), lambda: self._decode_frame(i)),
        )
        return out


def pixel_spacing_mpp(dataset) -> float | None:
    """µm/px from Pixel Spacing (mm, row\\column) of the shared or first per-frame group."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        try:
            spacing = getattr(dataset, groups)[0].PixelMeasuresSequence[0].PixelSpacing
            return valid_mpp(1000.0 * (float(spacing[0]) + float(spacing[1])) / 2)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            continue
    return None


def open_dicom(path: Path, assume_mpp: float | None) -> Slide:
    """Open a DICOM WSI file or folder: ``wsidicom`` first, the pydicom fallback for a file."""
    try:
        return _open_wsidicom(path, assume_mpp)
    except ScratchpathError:
        raise
    except Exception as err:
        if not path.is_file():
            raise ScratchpathError(f"{path}: no readable DICOM WSI ({first_line(err)})") from err
        why = first_line(err)
    try:
        meta, frames = _read_layout(path)
    except ScratchpathError as err:
        raise ScratchpathError(f"{err} (wsidicom refused it too: {why})") from err
    return _pydicom_slide(path, meta, frames, assume_mpp)


def open_pydicom(path: Path, assume_mpp: float | None) -> PydicomSlide:
    """Open one single-instance TILED_FULL DICOM WSI file with the pydicom fallback reader."""
    meta, frames = _read_layout(path)
    return _pydicom_slide(path, meta, frames, assume_mpp)


def _pydicom_slide(path: Path, meta, frames: list, assume_mpp: float | None) -> PydicomSlide:
    mpp = pixel_spacing_mpp(meta)
    source = "DICOM PixelSpacing"
    if mpp is None:
        mpp, source = require_assumed(path, assume_mpp), "assumed"
    return PydicomSlide(path, meta, frames, mpp, source)


def _open_wsidicom(path: Path, assume_mpp: float | None) -> WsiDicomSlide:
    import wsidicom
    from wsidicom.errors import WsiDicomNoResolutionError

    logger = logging.getLogger("wsidicom")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)  # its refusals come back to the caller as ours
    try:
        wsi = wsidicom.WsiDicom.open(path)
    finally:
        logger.setLevel(previous)
    try:
        try:
            mpp = valid_mpp((wsi.levels[0].mpp.width + wsi.levels[0].mpp.height) / 2)
        except WsiDicomNoResolutionError:
            mpp = None
        source = "DICOM PixelSpacing"
        if mpp is None:
            mpp, source = require_assumed(path, assume_mpp), "assumed"
        return WsiDicomSlide(path, wsi, mpp, source)
    except BaseException:
        wsi.close()
        raise


def _read_layout(path: Path) -> tuple:
    """The dataset without its pixels, and ``(offset, length)`` of every frame."""
    import pydicom

    with open(path, "rb") as fh:
        try:
            meta = pydicom.dcmread(fh, stop_before_pixels=True)
        except Exception as err:
            raise ScratchpathError(f"{path}: unreadable DICOM ({first_line(err)})") from err
        pixel_data_at = fh.tell()
        if str(meta.get("SOPClassUID", "")) != WSI_SOP_CLASS:
            raise ScratchpathError(f"{path}: DICOM file but not a whole-slide image (SOP class)")
        syntax = str(meta.file_meta.TransferSyntaxUID)
        if syntax not in _JPEG | _JPEG2000 | _JPEG_LS | _NATIVE:
            raise ScratchpathError(f"{path}: DICOM transfer syntax {syntax} is not supported")
        for name in ("TotalPixelMatrixColumns", "TotalPixelMatrixRows", "Rows", "Columns"):
            if name not in meta:
                raise ScratchpathError(f"{path}: DICOM WSI without {name}")
        if int(meta.get("SamplesPerPixel", 0)) != 3 or int(meta.get("BitsAllocated", 0)) != 8:
            raise ScratchpathError(f"{path}: not an 8-bit RGB DICOM WSI")
        if (
            meta.get("DimensionOrganizationType", "TILED_FULL") != "TILED_FULL"
            or int(meta.get("TotalPixelMatrixFocalPlanes", 1) or 1)
            * int(meta.get("NumberOfOpticalPaths", 1) or 1)
            != 1
        ):
            raise ScratchpathError(
                f"{path}: sparse, multi-focal or multi-channel DICOM needs wsidicom, which "
                "refused this file"
            )
        n_frames = int(meta.get("NumberOfFrames", 1))
        width, height = int(meta.TotalPixelMatrixColumns), int(meta.TotalPixelMatrixRows)
        expected = -(-width // int(meta.Columns)) * -(-height // int(meta.Rows))
        if n_frames != expected:
            raise ScratchpathError(
                f"{path}: {n_frames} frames, but a TILED_FULL grid needs {expected}"
            )
        frames = _frame_positions(fh, pixel_data_at, syntax, n_frames, meta, path)
    return meta, frames


def _frame_positions(fh, at: int, syntax: str, n_frames: int, meta, path: Path) -> list:
    """``(offset, length)`` of every frame, from the Pixel Data item headers only."""
    fh.seek(at)
    header = fh.read(12 if syntax != "1.2.840.10008.1.2" else 8)
    if len(header) < 8 or header[:4] != b"\xe0\x7f\x10\x00":
        raise ScratchpathError(f"{path}: DICOM file without Pixel Data")
    if syntax in _NATIVE:
        frame_bytes = int(meta.Rows) * int(meta.Columns) * 3
        start = at + len(header)
        if start + n_frames * frame_bytes > path.stat().st_size:
            raise ScratchpathError(f"{path}: truncated file (Pixel Data past end of file)")
        return [(start + i * frame_bytes, frame_bytes) for i in range(n_frames)]
    items = []
    size = path.stat().st_size
    while True:
        item = fh.read(8)
        if len(item) < 8:
            raise ScratchpathError(f"{path}: truncated file (Pixel Data items)")
        group, element, length = struct.unpack("<HHI", item)
        if (group, element) == (0xFFFE, 0xE0DD):  # sequence delimiter
            break
        if (group, element) != (0xFFFE, 0xE000) or fh.tell() + length > size:
            raise ScratchpathError(f"{path}: damaged or truncated encapsulated Pixel Data")
        items.append((fh.tell(), length))
        fh.seek(length, 1)
    fragments = items[1:]  # the first item is the Basic Offset Table
    if len(fragments) != n_frames:
        raise ScratchpathError(
            f"{path}: {len(fragments)} fragments for {n_frames} frames (multi-fragment frames "
            "need wsidicom, which refused this file)"
        )
    return fragments
