"""How each view path applies a drawn parameter row (:mod:`scratchpath.views.params`).

The order is the same on both paths: crop, D4, stain, brightness/contrast, (CPU only:
saturation/hue), gamma, blur, grayscale, solarisation.

- CPU path, :func:`cpu_view`: one (H, W, 3) uint8 tile, albumentations' own operations at the
  given parameters (``transform.apply(img, **params)``, OpenCV underneath), uint8 after each.
- Device path, :func:`device_crops` and :func:`device_colour`: all views of a batch at once
  with the batched kernels of :mod:`scratchpath.augment.kernels`, float 0..255 throughout, no
  host sync. An operation no view enables is skipped by its settings, never by its values.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.blur.functional import create_gaussian_kernel_1d

from scratchpath.augment import kernels
from scratchpath.augment.transforms import d4_numpy, hed_jitter_numpy
from scratchpath.views import params as P
from scratchpath.views.config import Colour

HED_BACKGROUND_OD = (0.3, 0.6)  # HEDJitter's default glass-sparing ramp

# albumentations transforms used only for their ``apply`` at given parameters.
_BRIGHTNESS_CONTRAST = A.RandomBrightnessContrast(p=1.0)
_GAMMA = A.RandomGamma(p=1.0)
_BLUR = A.GaussianBlur(blur_limit=0, p=1.0)
_GRAY = A.ToGray(p=1.0)
_SOLARIZE = A.Solarize(threshold_range=(0.5, 0.5), p=1.0)


def cpu_only_ops(colour: Colour) -> tuple[A.Compose | None, A.Compose | None]:
    """The augmentations only the CPU path has (HEStain; saturation/hue jitter), each as an
    albumentations pipeline that draws its own parameters (seed it with ``set_random_state``)."""
    stain = None
    if colour.stain == "hestain":
        stain = A.Compose([A.HEStain(method="random_preset", p=colour.stain_p)], p=1.0)
    jitter = None
    if colour.saturation > 0 or colour.hue > 0:
        op = A.ColorJitter(
            brightness=0, contrast=0, saturation=colour.saturation, hue=colour.hue,
            p=colour.color_p,
        )  # fmt: skip
        jitter = A.Compose([op], p=1.0)
    return stain, jitter


def cpu_view(
    tile: np.ndarray,
    row: np.ndarray,
    size: int,
    cpu_only: tuple[A.Compose | None, A.Compose | None] = (None, None),
) -> np.ndarray:
    """One view (size, size, 3) uint8 of an (H, W, 3) uint8 ``tile`` at parameters ``row``."""
    x0, y0, x1, y1 = (int(v) for v in row[P.BOX])
    view = tile[y0:y1, x0:x1]  # what A.RandomResizedCrop.apply does: crop, then INTER_LINEAR
    if view.shape[:2] != (size, size):
        view = cv2.resize(view, (size, size), interpolation=cv2.INTER_LINEAR)
    view = d4_numpy(view, int(row[P.D4]))
    stain, jitter = cpu_only
    alpha, beta = row[P.HED_ALPHA], row[P.HED_BETA]
    if (alpha != 1).any() or (beta != 0).any():
        view = hed_jitter_numpy(view, alpha, beta, HED_BACKGROUND_OD)
    if stain is not None:
        view = stain(image=view)["image"]
    if row[P.CONTRAST] != 1 or row[P.BRIGHTNESS] != 0:
        view = _BRIGHTNESS_CONTRAST.apply(
            view, alpha=float(row[P.CONTRAST]), beta=float(row[P.BRIGHTNESS])
        )
    if jitter is not None:
        view = jitter(image=view)["image"]
    if row[P.GAMMA] != 1:
        view = _GAMMA.apply(view, gamma=float(row[P.GAMMA]))
    if row[P.BLUR_SIGMA] > 0:
        view = _BLUR.apply(view, kernel=create_gaussian_kernel_1d(float(row[P.BLUR_SIGMA]), 0))
    if row[P.GRAY]:
        view = _GRAY.apply(view)
    if row[P.SOLARIZE]:
        view = _SOLARIZE.apply(view, threshold=0.5)
    return view


def device_crops(pixels: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """Crops with their D4 element of (B, 3, H, W) ``pixels`` at ``params`` (V, B, N_PARAMS):
    (V, B, 3, size, size) float32."""
    return kernels.resized_crops(pixels, params[..., P.BOX], params[..., P.D4], size)


def device_d4(crops: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The D4 element of each (N, 3, s, s) crop, ``params`` (N, N_PARAMS)."""
    return kernels.d4_torch(crops, params[:, P.D4])


def device_colour(x: torch.Tensor, params: torch.Tensor, colours: Sequence[Colour]) -> torch.Tensor:
    """HED, brightness/contrast, gamma, blur, grayscale, solarisation of float (N, 3, h, w)
    0..255 crops at ``params`` (N, N_PARAMS); ``colours``: the settings of every view among
    them (an operation none of them enables is skipped)."""
    if any(c.hed for c in colours):
        x = kernels.hed_jitter_float(
            x, params[:, P.HED_ALPHA], params[:, P.HED_BETA], HED_BACKGROUND_OD
        )
    if any(c.brightness_contrast for c in colours):
        x = kernels.brightness_contrast_float(x, params[:, P.CONTRAST], params[:, P.BRIGHTNESS])
    if any(c.gamma > 0 for c in colours):
        x = kernels.gamma_float(x, params[:, P.GAMMA])
    blurred = [c.blur_sigma[1] for c in colours if c.blur_p > 0]
    if blurred:
        x = kernels.gaussian_blur_float(x, params[:, P.BLUR_SIGMA], max(blurred))
    if any(c.gray_p > 0 for c in colours):
        x = kernels.to_gray_float(x, params[:, P.GRAY] > 0)
    if any(c.solarize_p > 0 for c in colours):
        x = kernels.solarize_float(x, params[:, P.SOLARIZE] > 0)
    return x
