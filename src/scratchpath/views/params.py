"""The random parameters of every view augmentation, drawn in one place for both view paths.

:func:`draw_params` is the only code that draws them. Both paths call it in the data-loader
worker from the tile's own generator, seeded by (seed, epoch, tile): the CPU path per tile
(``ViewGenerator.__call__``, then albumentations/OpenCV apply the row), the device path for the
whole batch (``ViewBatches``: the (V, B, 17) float32 array travels pinned with the tiles, and the
batched torch kernels apply it on the device with no host sync). So the two paths make the same
views of a tile, up to rounding, and agree in distribution by construction.

Per tile the generator's first draw is one ``rng.random((V, N_UNIFORMS))``: a fixed count per
view whatever the settings or the data, so a view's parameters never depend on the other views'
settings, the batch, the worker or the rank. The uniforms become, per view:

- crop box: ``A.RandomResizedCrop``'s rule (albumentations 2.0) — area ~ U(scale) of the tile,
  log aspect ratio ~ U(log ratio), sides rounded, the first of 10 tries that fits, top-left
  corner uniform over the integer positions; none fits: the central crop of the nearest ratio;
- D4 element: uniform over the 8 (0 when ``d4`` is off), numbered as ``augment.D4_ELEMENTS``;
- HED jitter with probability ``stain_p``: alpha ~ U(1 ± hed_strength), beta ~ U(±hed_strength)
  per stain (``HEDJitter``); else alpha 1, beta 0;
- brightness/contrast with probability ``color_p``: contrast factor ~ U(1 ± contrast), offset
  ~ 255 U(±brightness) (``A.RandomBrightnessContrast``, brightness by max); else 1, 0;
- gamma with probability ``color_p``: U(1 ± gamma) (``A.RandomGamma``); else 1;
- blur with probability ``blur_p``: sigma ~ U(blur_sigma) px (``A.GaussianBlur``); else 0;
- grayscale with probability ``gray_p``, solarisation with probability ``solarize_p`` (1 / 0).

CPU-only augmentations (HEStain, saturation/hue jitter) are not drawn here: the device path
refuses them, so there is no second path to agree with; albumentations draws them from the same
tile generator after this draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scratchpath.views.config import Colour

# Columns of a parameter row (one row per view and tile).
BOX = slice(0, 4)  # crop x0, y0, x1, y1 in tile pixels (whole numbers)
D4 = 4  # D4 element 0..7
HED_ALPHA = slice(5, 8)  # per stain (H, E, residual)
HED_BETA = slice(8, 11)
CONTRAST = 11  # x * CONTRAST + BRIGHTNESS, 0..255 units
BRIGHTNESS = 12
GAMMA = 13
BLUR_SIGMA = 14  # px; 0 = no blur
GRAY = 15  # 1.0 = apply
SOLARIZE = 16
N_PARAMS = 17

CROP_TRIES = 10  # A.RandomResizedCrop's
CROP_RATIO = (3 / 4, 4 / 3)  # A.RandomResizedCrop's default aspect-ratio range


def _uniform_layout(**counts: int) -> tuple[dict[str, slice], int]:
    layout, start = {}, 0
    for name, count in counts.items():
        layout[name] = slice(start, start + count)
        start += count
    return layout, start


_U, N_UNIFORMS = _uniform_layout(
    crop_area=CROP_TRIES, crop_ratio=CROP_TRIES, crop_start=2, d4=1, hed_p=1, hed=6, bc_p=1,
    bc=2, gamma_p=1, gamma=1, blur_p=1, blur=1, gray=1, solarize=1,
)  # fmt: skip


@dataclass(frozen=True)
class DrawSpec:
    """Every view's random-augmentation settings as (V,) arrays (built once per generator)."""

    d4: np.ndarray
    hed_strength: np.ndarray  # 0 where the view has no HED jitter
    stain_p: np.ndarray
    contrast: np.ndarray
    brightness: np.ndarray
    color_p: np.ndarray
    gamma: np.ndarray
    blur_p: np.ndarray
    blur_low: np.ndarray
    blur_high: np.ndarray
    gray_p: np.ndarray
    solarize_p: np.ndarray

    @classmethod
    def of(cls, colours: Sequence[Colour]) -> DrawSpec:
        def column(value) -> np.ndarray:
            return np.array([value(c) for c in colours], dtype=np.float64)

        return cls(
            d4=column(lambda c: c.d4).astype(bool),
            hed_strength=column(lambda c: c.hed_strength if c.hed else 0.0),
            stain_p=column(lambda c: c.stain_p),
            contrast=column(lambda c: c.contrast),
            brightness=column(lambda c: c.brightness),
            color_p=column(lambda c: c.color_p),
            gamma=column(lambda c: c.gamma),
            blur_p=column(lambda c: c.blur_p),
            blur_low=column(lambda c: c.blur_sigma[0]),
            blur_high=column(lambda c: c.blur_sigma[1]),
            gray_p=column(lambda c: c.gray_p),
            solarize_p=column(lambda c: c.solarize_p),
        )

    @property
    def n_views(self) -> int:
        return len(self.d4)


def draw_params(
    rngs: Sequence[np.random.Generator],
    spec: DrawSpec,
    scales: np.ndarray,
    tile_hw: tuple[int, int],
) -> np.ndarray:
    """The parameters of every view of each tile: (V, B, N_PARAMS) float32.

    Args:
        rngs: one generator per tile (B); each gives one ``random((V, N_UNIFORMS))`` call.
        spec: the views' settings.
        scales: (V, 2) crop area-fraction range of each view.
        tile_hw: (height, width) of the tiles, in pixels.
    """
    u = np.stack([rng.random((spec.n_views, N_UNIFORMS)) for rng in rngs], axis=1)  # (V, B, K)
    out = np.empty((*u.shape[:2], N_PARAMS), np.float32)
    out[..., BOX] = crop_boxes(
        u[..., _U["crop_area"]], u[..., _U["crop_ratio"]], u[..., _U["crop_start"]],
        np.asarray(scales, np.float64)[:, None], tile_hw,
    )  # fmt: skip

    def setting(values: np.ndarray) -> np.ndarray:  # (V,) -> (V, 1): broadcast over tiles
        return values[:, None]

    def chance(name: str, p: np.ndarray) -> np.ndarray:  # (V, B) bool
        return u[..., _U[name]][..., 0] < setting(p)

    def symmetric(name: str, half_width: np.ndarray) -> np.ndarray:  # U(-w, w)
        return (2 * u[..., _U[name]] - 1) * half_width

    out[..., D4] = np.where(setting(spec.d4), np.floor(8 * u[..., _U["d4"]][..., 0]), 0)
    hed = chance("hed_p", spec.stain_p)[..., None] & setting(spec.hed_strength > 0)[..., None]
    jitter = symmetric("hed", setting(spec.hed_strength)[..., None])  # (V, B, 6)
    out[..., HED_ALPHA] = np.where(hed, 1 + jitter[..., :3], 1.0)
    out[..., HED_BETA] = np.where(hed, jitter[..., 3:], 0.0)
    bc = chance("bc_p", spec.color_p) & setting((spec.contrast > 0) | (spec.brightness > 0))
    shift = symmetric("bc", np.stack([setting(spec.contrast), setting(spec.brightness)], -1))
    out[..., CONTRAST] = np.where(bc, 1 + shift[..., 0], 1.0)
    out[..., BRIGHTNESS] = np.where(bc, 255 * shift[..., 1], 0.0)
    gamma = chance("gamma_p", spec.color_p) & setting(spec.gamma > 0)
    out[..., GAMMA] = np.where(
        gamma, 1 + symmetric("gamma", setting(spec.gamma)[..., None])[..., 0], 1
    )
    low, high = setting(spec.blur_low), setting(spec.blur_high)
    sigma = low + (high - low) * u[..., _U["blur"]][..., 0]
    out[..., BLUR_SIGMA] = np.where(chance("blur_p", spec.blur_p), sigma, 0.0)
    out[..., GRAY] = chance("gray", spec.gray_p)
    out[..., SOLARIZE] = chance("solarize", spec.solarize_p)
    return out


def crop_boxes(
    u_area: np.ndarray,
    u_ratio: np.ndarray,
    u_start: np.ndarray,
    scale: np.ndarray,
    tile_hw: tuple[int, int],
    ratio: tuple[float, float] = CROP_RATIO,
) -> np.ndarray:
    """``A.RandomResizedCrop``'s crop boxes from uniforms, vectorised: ``u_area``, ``u_ratio``
    (..., 10) per try, ``u_start`` (..., 2) (row, column), ``scale`` (..., 2) broadcastable
    area-fraction ranges -> (..., 4) ``x0, y0, x1, y1`` in tile pixels (whole numbers)."""
    height, width = tile_hw
    area = height * width
    low, high = scale[..., 0:1] * area, scale[..., 1:2] * area
    target = low + (high - low) * u_area  # (..., tries)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_low + (log_high - log_low) * u_ratio)
    w = np.rint(np.sqrt(target * aspect))  # round half to even, as Python's round()
    h = np.rint(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(-1)[..., None]  # the first try that fits (0 if none)
    w, h = np.take_along_axis(w, first, -1)[..., 0], np.take_along_axis(h, first, -1)[..., 0]
    y0 = np.floor((height - h + 1) * u_start[..., 0])
    x0 = np.floor((width - w + 1) * u_start[..., 1])
    # No try fits: the central crop of the aspect ratio nearest the tile's.
    if width / height < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    found = fits.any(-1)
    x0 = np.where(found, x0, (width - fw) // 2)
    y0 = np.where(found, y0, (height - fh) // 2)
    w, h = np.where(found, w, fw), np.where(found, h, fh)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=-1)
