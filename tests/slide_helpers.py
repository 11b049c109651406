"""Helpers shared by the slide-reading tests."""

from __future__ import annotations

import numpy as np


def reference_window(full: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Window (x, y, w, h) of a fully decoded level, padded white outside it (what
    ``Slide.read_region`` promises)."""
    out = np.full((h, w, 3), 255, np.uint8)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, full.shape[1]), min(y + h, full.shape[0])
    if x0 < x1 and y0 < y1:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = full[y0:y1, x0:x1, :3]
    return out
