"""Slides read with OpenSlide (``openslide-python`` + the ``openslide-bin`` wheel, no system
library): 3DHistech MRXS, Leica SCN, Ventana BIF, Philips TIFF, Hamamatsu VMS/VMU, Sakura
SVSLIDE, Trestle TIFF, Zeiss CZI, and everything else OpenSlide 4 reads.

µm/px is OpenSlide's ``openslide.mpp-x`` / ``openslide.mpp-y`` (each vendor's own metadata, read
by OpenSlide). OpenSlide returns premultiplied RGBA where a region leaves the scanned area;
those pixels are composited onto white, the same background the other backends pad with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scratchpath.errors import ScratchpathError
from scratchpath.slides.base import Slide, first_line, levels_from_sizes, require_assumed, valid_mpp


def detect_format(path: Path) -> str | None:
    """OpenSlide's vendor name for ``path`` (``"aperio"``, ``"mirax"``, ...), None if it reads
    no such format or OpenSlide is not installed."""
    try:
        import openslide
    except ImportError:  # pragma: no cover - openslide-bin is a dependency
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:
        return None


class OpenSlideSlide(Slide):
    """A slide read with OpenSlide; windows are given to it in level-0 coordinates."""

    backend = "openslide"

    def __init__(self, path: Path, handle, vendor: str, mpp: float, mpp_source: str) -> None:
        self._handle = handle
        super().__init__(path, vendor, levels_from_sizes(list(handle.level_dimensions), mpp),
                         mpp_source)  # fmt: skip
        self._downsamples = [float(d) for d in handle.level_downsamples]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _read_inside(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if self._handle is None:
            raise ValueError(f"{self.path}: slide is closed")
        downsample = self._downsamples[level]
        origin = (round(x0 * downsample), round(y0 * downsample))
        try:
            rgba = np.asarray(self._handle.read_region(origin, level, (x1 - x0, y1 - y0)))
        except Exception as err:  # openslide.OpenSlideError for damaged tiles
            raise ScratchpathError(f"{self.path}: cannot read region ({first_line(err)})") from err
        rgb = rgba[..., :3]
        alpha = rgba[..., 3:4]
        if (alpha == 255).all():
            return rgb
        # openslide-python un-premultiplies; blend what is not fully opaque onto white.
        blended = rgb * (alpha / 255.0) + 255.0 * (1.0 - alpha / 255.0)
        return np.rint(blended).astype(np.uint8)


def open_openslide(path: Path, assume_mpp: float | None) -> OpenSlideSlide:
    """Open ``path`` with OpenSlide; ScratchpathError naming the file when it cannot."""
    try:
        import openslide
    except ImportError as err:  # pragma: no cover - openslide-bin is a dependency
        raise ScratchpathError(
            f"{path}: needs OpenSlide (pip install openslide-bin openslide-python)"
        ) from err
    try:
        handle = openslide.OpenSlide(str(path))
    except Exception as err:
        raise ScratchpathError(f"{path}: OpenSlide cannot read it ({first_line(err)})") from err
    try:
        props = handle.properties
        vendor = props.get(openslide.PROPERTY_NAME_VENDOR) or "openslide"
        names = (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y)
        values = [float(props[n]) for n in names if props.get(n) not in (None, "")]
        mpp = valid_mpp(sum(values) / len(values)) if values else None
        source = "OpenSlide mpp-x/mpp-y"
        if mpp is None:
            mpp, source = require_assumed(path, assume_mpp), "assumed"
        return OpenSlideSlide(path, handle, vendor, mpp, source)
    except BaseException:
        handle.close()
        raise
