"""Whole-slide images: levels, µm per pixel and region reads, one interface over four backends.

======================  =============  =======================================================
format                  backend        µm/px from
======================  =============  =======================================================
Aperio SVS              tifffile       ImageDescription ``MPP =``
Hamamatsu NDPI          tifffile       TIFF X/YResolution (centimetre)
OME-TIFF                tifffile       OME ``PhysicalSizeX/Y``
pyramidal TIFF          tifffile       TIFF X/YResolution (centimetre or inch)
DICOM WSI               wsidicom       Pixel Spacing (Pixel Measures functional group)
  (non-conformant)      pydicom        same; fallback for single-instance files wsidicom refuses
MRXS, SCN, BIF, Philips openslide      ``openslide.mpp-x/y`` (each vendor's metadata)
TIFF, VMS/VMU, ...
PNG / JPEG              pillow         none: ``assume_mpp`` required
======================  =============  =======================================================

:func:`open_slide` picks the backend from the file's first bytes: DICOM (``DICM``) goes to
wsidicom; TIFF goes to tifffile unless OpenSlide recognises a vendor layout that tifffile's path
here does not handle (Leica, Ventana, Philips, Trestle), or tifffile finds a pixel layout it
does not read; anything else OpenSlide recognises (MRXS, VMS, ...) goes to OpenSlide. A file
none of them reads gets one line naming it and the formats supported. ``backend=`` forces one.
A slide without recorded µm/px is refused unless ``assume_mpp`` is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from scratchpath.errors import ScratchpathError
from scratchpath.slides import dicom, openslide_backend, tiff
from scratchpath.slides.base import (
    IMAGE_SUFFIXES,
    SLIDE_SUFFIXES,
    JpegTiles,
    Level,
    Slide,
    is_slide_file,
    level_for_mpp,
    native_within,
    slide_stem,
)

__all__ = [
    "BACKENDS",
    "FORMATS",
    "IMAGE_SUFFIXES",
    "SLIDE_SUFFIXES",
    "JpegTiles",
    "Level",
    "Slide",
    "is_slide_file",
    "level_for_mpp",
    "native_within",
    "open_slide",
    "slide_stem",
]

Backend = Literal["auto", "tifffile", "wsidicom", "pydicom", "openslide", "pillow"]
BACKENDS: tuple[str, ...] = ("auto", "tifffile", "wsidicom", "pydicom", "openslide", "pillow")
FORMATS = (
    "Aperio SVS, Hamamatsu NDPI, OME-TIFF, pyramidal TIFF (tifffile); DICOM WSI (wsidicom); "
    "MRXS, SCN, BIF, Philips TIFF, VMS/VMU, SVSLIDE, CZI and other OpenSlide formats "
    "(openslide); PNG/JPEG with assume_mpp"
)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# TIFF-based vendors whose layout (several images per file, overlapping tiles, XML-only µm/px)
# OpenSlide assembles and tifffile's one-series path here does not.
_OPENSLIDE_TIFF_VENDORS = frozenset({"leica", "ventana", "philips", "trestle"})


def open_slide(
    path: str | Path, assume_mpp: float | None = None, backend: Backend = "auto"
) -> Slide:
    """Open a whole-slide image (any format in :data:`FORMATS`) or a PNG/JPEG image.

    Args:
        path: the file (or, for DICOM, a folder holding one slide's instances; for MRXS the
            ``.mrxs`` file beside its data folder).
        assume_mpp: µm per pixel of level 0 to use when the file records none (required for
            PNG/JPEG); a value recorded in the file always wins.
        backend: ``"auto"`` (chosen from the file, see the module docstring) or one of
            :data:`BACKENDS` to force it.

    Raises:
        ScratchpathError: ``"<path>: <reason>"`` for a missing, empty, truncated or unsupported
            file, or one without µm/px and no ``assume_mpp``.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ScratchpathError(f"backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not path.exists():
        raise ScratchpathError(f"{path}: no such file")
    if path.is_dir():
        if backend not in ("auto", "wsidicom"):
            raise ScratchpathError(f"{path}: a folder (only a DICOM slide may be a folder)")
        return dicom.open_dicom(path, assume_mpp)
    if not path.is_file():
        raise ScratchpathError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ScratchpathError(f"{path}: empty file")
    forced = {
        "tifffile": tiff.open_tiff,
        "wsidicom": dicom.open_dicom,
        "pydicom": dicom.open_pydicom,
        "openslide": openslide_backend.open_openslide,
        "pillow": tiff.open_image,
    }
    if backend != "auto":
        return forced[backend](path, assume_mpp)
    with open(path, "rb") as f:
        magic = f.read(132)
    if dicom.is_dicom(magic):
        return dicom.open_dicom(path, assume_mpp)
    if magic[:4] in _TIFF_MAGIC:
        vendor = openslide_backend.detect_format(path)
        if vendor in _OPENSLIDE_TIFF_VENDORS:
            return openslide_backend.open_openslide(path, assume_mpp)
        try:
            return tiff.open_tiff(path, assume_mpp)
        except tiff.UnsupportedLayoutError:
            if vendor is None:
                raise
            return openslide_backend.open_openslide(path, assume_mpp)
    if magic.startswith(b"\x89PNG") or magic.startswith(b"\xff\xd8\xff"):
        return tiff.open_image(path, assume_mpp)
    if openslide_backend.detect_format(path) is not None:  # MRXS, VMS/VMU, SVSLIDE, ...
        return openslide_backend.open_openslide(path, assume_mpp)
    raise ScratchpathError(
        f"{path}: not a TIFF, DICOM, PNG/JPEG or OpenSlide-readable file (formats read: {FORMATS})"
    )
