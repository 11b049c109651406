"""Pathology augmentations: albumentations transforms and the batched torch kernels.

- :mod:`~scratchpath.augment.transforms`: albumentations-compatible transforms (``HEDJitter``,
  ``D4``, ``MacenkoNormalize``), the building blocks of CPU pipelines, with the H&E constants
  (``HE_MEAN``, ``HE_STD``) and the HED maths they rest on.
- :mod:`~scratchpath.augment.kernels`: one batched, sync-free torch kernel per view
  augmentation, at given per-sample parameters (the device view path).

The random parameters of the SSL views are drawn by :mod:`scratchpath.views.params`, once for
both paths.
"""

from __future__ import annotations

from scratchpath.augment.kernels import (
    brightness_contrast_float,
    d4_torch,
    gamma_float,
    gaussian_blur_float,
    hed_jitter_float,
    resized_crops,
    solarize_float,
    to_gray_float,
)
from scratchpath.augment.transforms import (
    D4,
    D4_ELEMENTS,
    HE_MEAN,
    HE_STD,
    HED_FROM_RGB,
    RGB_FROM_HED,
    HEDJitter,
    MacenkoNormalize,
    d4_numpy,
    hed_affine,
    hed_jitter_numpy,
    micron_crop_scale,
)

__all__ = [
    "D4",
    "D4_ELEMENTS",
    "HED_FROM_RGB",
    "HE_MEAN",
    "HE_STD",
    "RGB_FROM_HED",
    "HEDJitter",
    "MacenkoNormalize",
    "brightness_contrast_float",
    "d4_numpy",
    "d4_torch",
    "gamma_float",
    "gaussian_blur_float",
    "hed_affine",
    "hed_jitter_float",
    "hed_jitter_numpy",
    "micron_crop_scale",
    "resized_crops",
    "solarize_float",
    "to_gray_float",
]
