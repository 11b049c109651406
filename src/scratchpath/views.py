"""View generators: the random views an SSL objective sees of each tile.

A view generator turns one (H, W, 3) uint8 tile into a list of (3, h, w) uint8 views on the CPU
(data-loader workers), and ``on_device`` turns the collated (B, 3, h, w) uint8 batches into
float32 views normalised with ``mean`` / ``std`` on the training device. With
``device_augment=True`` the CPU does only the random resized crop(s) and ``on_device`` applies
D4, stain jitter, brightness/contrast, gamma, blur and grayscale batched in torch (the same
distributions as the CPU path), which moves most augmentation cost off the data workers.

Constructor arguments are plain typed values so that a LightningCLI recipe sets them, e.g.::

    views:
      class_path: scratchpath.views.TwoViews
      init_args: {output_size: 224, crop_scale: [0.2, 1.0], stain: hed, hed_strength: 0.1}
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import albumentations as A
import cv2
import numpy as np
import torch

from scratchpath import augment
from scratchpath.augment import HE_MEAN, HE_STD, HEDJitter
from scratchpath.errors import ScratchpathError

__all__ = ["MAEView", "MultiCrop", "TwoViews", "ViewGenerator"]

StainMode = Literal["hed", "hestain", "none"]


@dataclass(frozen=True)
class _Colour:
    """Colour and geometry augmentations applied after the crop (shared by all view kinds)."""

    d4: bool = True
    stain: StainMode = "hed"
    hed_strength: float = 0.1
    stain_p: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.0
    hue: float = 0.0
    gamma: float = 0.1
    color_p: float = 0.8
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    gray_p: float = 0.1


class _Augmentations:
    """One family of views: a crop to ``size`` plus the colour/geometry augmentations, as an
    albumentations pipeline (CPU) and as its batched torch twin (``on_device``).

    Order: D4, stain, brightness/contrast, saturation/hue, gamma, blur, grayscale. With
    ``device_augment`` the CPU keeps only what has no torch twin (``HEStain``, saturation/hue).
    """

    def __init__(self, size: int, colour: _Colour, device_augment: bool):
        self.size, self.c, self.device_augment = size, colour, device_augment
        self._pipelines: dict[tuple[float, float], A.Compose] = {}  # per crop scale, lazily
        rest: list[A.BasicTransform] = []
        if colour.stain == "hestain":  # no torch twin: stays on the CPU even with device_augment
            rest.append(A.HEStain(method="random_preset", p=colour.stain_p))
        if not device_augment:
            rest += self._cpu_colour_geometry()
        elif colour.saturation > 0 or colour.hue > 0:  # no torch twin either
            rest.append(self._saturation_hue())
        self.rest = rest  # what follows the crop on the CPU

    def _cpu_colour_geometry(self) -> list[A.BasicTransform]:
        c, out = self.c, []
        if c.d4:
            out.append(augment.D4(p=1.0))
        if c.stain == "hed" and c.hed_strength > 0:
            out.append(HEDJitter(strength=c.hed_strength, p=c.stain_p))
        if c.brightness > 0 or c.contrast > 0:
            out.append(
                A.RandomBrightnessContrast(
                    brightness_limit=(-c.brightness, c.brightness),
                    contrast_limit=(-c.contrast, c.contrast),
                    p=c.color_p,
                )
            )
        if c.saturation > 0 or c.hue > 0:
            out.append(self._saturation_hue())
        if c.gamma > 0:
            limit = (100 * (1 - c.gamma), 100 * (1 + c.gamma))
            out.append(A.RandomGamma(gamma_limit=limit, p=c.color_p))
        if c.blur_p > 0:
            out.append(A.GaussianBlur(blur_limit=0, sigma_limit=c.blur_sigma, p=c.blur_p))
        if c.gray_p > 0:
            out.append(A.ToGray(p=c.gray_p))
        return out

    def _saturation_hue(self) -> A.ColorJitter:
        c = self.c
        return A.ColorJitter(
            brightness=0, contrast=0, saturation=c.saturation, hue=c.hue, p=c.color_p
        )

    def pipeline(self, scale: tuple[float, float]) -> A.Compose:
        """Crop (area fraction ``scale``, resized to ``size``) + the CPU augmentations."""
        if scale not in self._pipelines:
            rrc = A.RandomResizedCrop(size=(self.size, self.size), scale=scale, p=1.0)
            self._pipelines[scale] = A.Compose([rrc, *self.rest], p=1.0)
        return self._pipelines[scale]

    def __call__(
        self,
        image: np.ndarray,
        scale: tuple[float, float],
        rng: np.random.Generator,
        py: random.Random,
    ) -> torch.Tensor:
        pipeline = self.pipeline(scale)
        pipeline.set_random_state(rng, py)  # one shared stream: cheap to reseed per sample
        view = pipeline(image=image)["image"]
        return torch.from_numpy(np.stack(cv2.split(view)))  # (3, h, w); faster than transpose

    def on_device(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The CPU pipeline's colour/geometry part on a uint8 (B, 3, h, w) batch."""
        c, b, dev, g = self.c, x.shape[0], x.device, generator

        def chance(p: float) -> torch.Tensor:
            return torch.rand(b, generator=g, device=dev) < p

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(b, generator=g, device=dev)

        if c.d4:
            x = augment.d4_torch(x, torch.randint(0, 8, (b,), generator=g, device=dev))
        if c.stain == "hed" and c.hed_strength > 0:
            alpha, beta = augment.hed_params(b, c.hed_strength, c.hed_strength, g, dev)
            apply = chance(c.stain_p)[:, None]
            alpha, beta = torch.where(apply, alpha, 1.0), torch.where(apply, beta, 0.0)
            x = augment.hed_jitter_torch(x, alpha, beta)
        if c.brightness > 0 or c.contrast > 0:
            apply = chance(c.color_p)
            alpha = torch.where(apply, 1 + uniform(-c.contrast, c.contrast), 1.0)
            beta = torch.where(apply, 255 * uniform(-c.brightness, c.brightness), 0.0)
            x = augment.brightness_contrast_torch(x, alpha, beta)
        if c.gamma > 0:
            gamma = torch.where(chance(c.color_p), uniform(1 - c.gamma, 1 + c.gamma), 1.0)
            x = augment.gamma_torch(x, gamma)
        if c.blur_p > 0:
            sigma = torch.where(chance(c.blur_p), uniform(*c.blur_sigma), 0.0)
            x = augment.gaussian_blur_torch(x, sigma)
        if c.gray_p > 0:
            x = augment.to_gray_torch(x, chance(c.gray_p))
        return x


class ViewGenerator:
    """Base of the view generators (contract in docs/architecture.md "augment and views").

    Subclasses fill ``self._families`` with ``(augmentations, crop scale, count)`` triples; the
    views come out family by family (for multi-crop: globals first). ``mpp`` (µm/px of the
    tiles) is only needed for ``crop_microns``; a data module may set it from the store when
    the recipe leaves it None.
    """

    n_views: int
    mean: tuple[float, float, float] = HE_MEAN
    std: tuple[float, float, float] = HE_STD

    def __init__(
        self,
        *,
        crop_microns: tuple[float, float] | None = None,
        mpp: float | None = None,
        device_augment: bool = False,
        seed: int = 0,
    ):
        self.crop_microns = None if crop_microns is None else tuple(crop_microns)
        self.mpp = mpp
        self.device_augment = device_augment
        self.seed = seed
        self._families: list[tuple[_Augmentations, tuple[float, float], int]] = []
        self._generators: dict[str, torch.Generator] = {}
        self.set_seed(seed)

    @property
    def input_size(self) -> int:
        """Side length of the first (global) views: the input size the backbone trains at."""
        return int(self._families[0][0].size)

    def set_seed(self, seed: int) -> None:
        """Seed the next call (the data module calls this per sample with a derived seed)."""
        self._rng = np.random.default_rng(seed)
        self._py = random.Random(seed)

    def _scale(self, family: int, default: tuple[float, float], tile_px: int):
        if self.crop_microns is None or family != 0:  # µm crops set the first (global) family
            return default
        return augment.micron_crop_scale(self.crop_microns, self.mpp, tile_px)

    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        """The views of one (H, W, 3) uint8 tile, each a (3, h, w) uint8 tensor."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ScratchpathError(
                f"views: expected an (H, W, 3) uint8 tile, got {image.shape} {image.dtype}"
            )
        views = []
        for index, (family, scale, count) in enumerate(self._families):
            scale = self._scale(index, scale, min(image.shape[:2]))
            views += [family(image, scale, self._rng, self._py) for _ in range(count)]
        return views

    def on_device(
        self, views: list[torch.Tensor], generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """uint8 (B, 3, h, w) views -> float32 views normalised by ``mean`` / ``std``, after the
        device-side augmentations when ``device_augment`` (random stream: ``generator``, else
        one per device seeded with ``seed``)."""
        families = [f for f, _, count in self._families for _ in range(count)]
        if len(views) != len(families):
            raise ScratchpathError(
                f"views: expected {len(families)} view batches, got {len(views)}"
            )
        out = []
        for family, x in zip(families, views, strict=True):
            if self.device_augment:
                x = family.on_device(x, generator or self._device_generator(x.device))
            out.append(self.normalize(x))
        return out

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, h, w) -> float32 ``(x / 255 - mean) / std``."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1) * 255
        return (x.float() - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Float normalised views back to uint8 (for display)."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1) * 255
        return (x * std + mean).round().clamp(0, 255).to(torch.uint8)

    def _device_generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_generators"] = {}  # torch.Generator does not pickle; rebuilt per process
        return state


def _family(
    size: int, scale: tuple[float, float], colour: _Colour, device_augment: bool
) -> tuple[_Augmentations, tuple[float, float]]:
    if size < 1:
        raise ScratchpathError(f"views: output size must be positive, got {size}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ScratchpathError(f"views: crop scale needs 0 < min <= max <= 1, got {scale}")
    return _Augmentations(size, colour, device_augment), (float(scale[0]), float(scale[1]))


class TwoViews(ViewGenerator):
    """Two independent random views of each tile (SimCLR, Chen et al. 2020; MoCo v3, Chen et
    al. 2021).

    Each view: random resized crop (area fraction ``crop_scale``, or a side in µm via
    ``crop_microns`` and the tiles' ``mpp``), D4 (``d4``), stain jitter (``stain``: "hed" =
    Tellez HED jitter of ``hed_strength``, "hestain" = albumentations' ``HEStain``, "none"; with
    probability ``stain_p``), brightness/contrast/saturation/hue/gamma (each with probability
    ``color_p``), Gaussian blur (``blur_p``, sigma in ``blur_sigma`` px), grayscale (``gray_p``).
    ``device_augment``: the CPU only crops; ``on_device`` does the rest batched in torch.
    """

    def __init__(
        self,
        output_size: int = 224,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_microns: tuple[float, float] | None = None,
        mpp: float | None = None,
        d4: bool = True,
        stain: StainMode = "hed",
        hed_strength: float = 0.1,
        stain_p: float = 0.8,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.0,
        hue: float = 0.0,
        gamma: float = 0.1,
        color_p: float = 0.8,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        gray_p: float = 0.1,
        device_augment: bool = False,
        seed: int = 0,
    ):
        super().__init__(
            crop_microns=crop_microns, mpp=mpp, device_augment=device_augment, seed=seed
        )
        colour = _Colour(
            d4, stain, hed_strength, stain_p, brightness, contrast, saturation, hue, gamma,
            color_p, blur_p, tuple(blur_sigma), gray_p,
        )  # fmt: skip
        family, scale = _family(output_size, crop_scale, colour, device_augment)
        self._families = [(family, scale, 2)]
        self.n_views = 2


class MultiCrop(ViewGenerator):
    """DINO multi-crop (Caron et al. 2021): ``n_global_crops`` large crops (``global_size`` px,
    area ``global_scale``) followed by ``n_local_crops`` small ones (``local_size``,
    ``local_scale``), all with the colour/geometry augmentations of :class:`TwoViews`.
    ``crop_microns`` (with ``mpp``) sets the global crop side in µm instead of ``global_scale``.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_global_crops: int = 2,
        n_local_crops: int = 6,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        crop_microns: tuple[float, float] | None = None,
        mpp: float | None = None,
        d4: bool = True,
        stain: StainMode = "hed",
        hed_strength: float = 0.1,
        stain_p: float = 0.8,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.0,
        hue: float = 0.0,
        gamma: float = 0.1,
        color_p: float = 0.8,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        gray_p: float = 0.1,
        device_augment: bool = False,
        seed: int = 0,
    ):
        super().__init__(
            crop_microns=crop_microns, mpp=mpp, device_augment=device_augment, seed=seed
        )
        if n_global_crops < 1 or n_local_crops < 0:
            raise ScratchpathError("MultiCrop: need n_global_crops >= 1 and n_local_crops >= 0")
        colour = _Colour(
            d4, stain, hed_strength, stain_p, brightness, contrast, saturation, hue, gamma,
            color_p, blur_p, tuple(blur_sigma), gray_p,
        )  # fmt: skip
        global_family, global_scale = _family(global_size, global_scale, colour, device_augment)
        local_family, local_scale = _family(local_size, local_scale, colour, device_augment)
        self._families = [
            (global_family, global_scale, n_global_crops),
            (local_family, local_scale, n_local_crops),
        ]
        self.n_global_crops = n_global_crops
        self.n_views = n_global_crops + n_local_crops


class MAEView(ViewGenerator):
    """One mild view for masked autoencoding (He et al. 2022): random resized crop and D4; by
    default no colour change (``hed_strength`` > 0 adds a light HED jitter)."""

    def __init__(
        self,
        output_size: int = 224,
        crop_scale: tuple[float, float] = (0.4, 1.0),
        crop_microns: tuple[float, float] | None = None,
        mpp: float | None = None,
        d4: bool = True,
        hed_strength: float = 0.0,
        device_augment: bool = False,
        seed: int = 0,
    ):
        super().__init__(
            crop_microns=crop_microns, mpp=mpp, device_augment=device_augment, seed=seed
        )
        colour = _Colour(
            d4=d4, hed_strength=hed_strength, stain_p=1.0, brightness=0.0, contrast=0.0,
            gamma=0.0, color_p=0.0, blur_p=0.0, gray_p=0.0,
        )  # fmt: skip
        family, scale = _family(output_size, crop_scale, colour, device_augment)
        self._families = [(family, scale, 1)]
        self.n_views = 1
