"""View generators: the random views an SSL objective sees of each tile.

Two interchangeable paths build the same views (same distributions, checked statistically in
``tests/test_views.py``):

* **CPU path** (``device_augment=False``): a data-loader worker turns each (H, W, 3) uint8 tile
  into a list of (3, h, w) uint8 views with albumentations (``__call__``), and ``on_device``
  only normalises the collated (B, 3, h, w) batches on the training device.
* **Device path** (``device_augment=True``): workers only read tiles (for JPEG stores: their
  encoded bytes; the data module decodes them batched on the device with nvJPEG), and
  ``device_views`` builds every view of a batch on the training device: the random resized
  crops of all views of one size in one ``grid_sample`` (D4 folded into the sampling grid),
  then HED jitter, brightness/contrast, gamma, blur, grayscale and solarisation batched with
  per-sample parameters, without any device-to-host synchronisation.

``device_augment=None`` (the default) means "device path on a GPU, CPU path on a CPU": the data
module resolves it from the trainer's device (:meth:`ViewGenerator.resolve_device_augment`).
On a CPU the CPU path is faster per core: ``benchmarks/bench_input.py`` prints both.

Constructor arguments are plain typed values so that a LightningCLI recipe sets them, e.g.::

    views:
      class_path: scratchpath.views.TwoViews
      init_args: {output_size: 224, crop_scale: [0.2, 1.0], stain: hed, hed_strength: 0.1}
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
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
    solarize_p: float = 0.0

    @property
    def on_device_too(self) -> bool:
        """Whether the device path has every augmentation (HEStain, hue, saturation: no)."""
        return self.stain != "hestain" and self.saturation == 0 and self.hue == 0


def _cpu_pipeline(size: int, scale: tuple[float, float], c: _Colour) -> A.Compose:
    """albumentations: crop, then D4, stain, brightness/contrast, saturation/hue, gamma, blur,
    grayscale, solarisation (the order of the device path)."""
    ops: list[A.BasicTransform] = [A.RandomResizedCrop(size=(size, size), scale=scale, p=1.0)]
    if c.d4:
        ops.append(augment.D4(p=1.0))
    if c.stain == "hed" and c.hed_strength > 0:
        ops.append(HEDJitter(strength=c.hed_strength, p=c.stain_p))
    elif c.stain == "hestain":
        ops.append(A.HEStain(method="random_preset", p=c.stain_p))
    if c.brightness > 0 or c.contrast > 0:
        ops.append(
            A.RandomBrightnessContrast(
                brightness_limit=(-c.brightness, c.brightness),
                contrast_limit=(-c.contrast, c.contrast),
                p=c.color_p,
            )
        )
    if c.saturation > 0 or c.hue > 0:
        ops.append(
            A.ColorJitter(brightness=0, contrast=0, saturation=c.saturation, hue=c.hue, p=c.color_p)
        )
    if c.gamma > 0:
        ops.append(
            A.RandomGamma(gamma_limit=(100 * (1 - c.gamma), 100 * (1 + c.gamma)), p=c.color_p)
        )
    if c.blur_p > 0:
        ops.append(A.GaussianBlur(blur_limit=0, sigma_limit=c.blur_sigma, p=c.blur_p))
    if c.gray_p > 0:
        ops.append(A.ToGray(p=c.gray_p))
    if c.solarize_p > 0:
        ops.append(A.Solarize(threshold_range=(0.5, 0.5), p=c.solarize_p))
    return A.Compose(ops, p=1.0)


@dataclass
class _Family:
    """Views of one output size and crop scale; ``colours`` has one entry per view (they differ
    only for asymmetric augmentation, e.g. DINO's two global crops)."""

    size: int
    scale: tuple[float, float]
    colours: list[_Colour]


class ViewGenerator:
    """Base of the view generators (contract in docs/architecture.md "augment and views").

    Subclasses fill ``self._families``; the views come out family by family (for multi-crop:
    globals first). ``mpp`` (µm/px of the tiles) is only needed for ``crop_microns``; a data
    module may set it from the store when the recipe leaves it None. ``device_augment``: True
    for the device path, False for the CPU path, None to let the data module choose (device
    path on CUDA); see the module docstring.

    Progressive resizing (``low_res_size``, ``low_res_epochs``): for the first
    ``low_res_epochs`` epochs every view is scaled by ``low_res_size / input_size`` (the
    first family's side becomes ``low_res_size``); after that the views have their full size.
    Small views early make cheap steps; the full size last makes the model's input size what
    it finished training at (Touvron et al. 2019, FixRes: a CNN trained on random-resized
    crops tests best above its training size, and better still once trained there; Tan & Le
    2021, EfficientNetV2's progressive learning). The backbone must accept both sizes (CNNs
    do; a ViT needs ``dynamic_img_size=True``).
    """

    n_views: int
    mean: tuple[float, float, float] = HE_MEAN
    std: tuple[float, float, float] = HE_STD

    def __init__(
        self,
        *,
        crop_microns: tuple[float, float] | None = None,
        mpp: float | None = None,
        device_augment: bool | None = None,
        low_res_size: int | None = None,
        low_res_epochs: int = 0,
        seed: int = 0,
    ):
        if low_res_epochs < 0 or (low_res_size is not None and low_res_size < 1):
            raise ScratchpathError(
                f"views: low_res_size must be positive and low_res_epochs >= 0, got "
                f"{low_res_size} and {low_res_epochs}"
            )
        if low_res_epochs and low_res_size is None:
            raise ScratchpathError("views: low_res_epochs needs low_res_size (the early side)")
        self.low_res_size = low_res_size
        self.low_res_epochs = int(low_res_epochs)
        self._epoch = 0
        self.crop_microns = None if crop_microns is None else tuple(crop_microns)
        self.mpp = mpp
        self.device_augment = device_augment
        self.seed = seed
        self._families: list[_Family] = []
        self._pipelines: dict[tuple, A.Compose] = {}  # per (size, scale, colour), lazily
        self._generators: dict[str, torch.Generator] = {}
        self._constants: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.set_seed(seed)

    def _set_families(self, families: list[_Family]) -> None:
        for family in families:
            if family.size < 1:
                raise ScratchpathError(f"views: output size must be positive, got {family.size}")
            low, high = family.scale
            if not 0 < low <= high <= 1:
                raise ScratchpathError(
                    f"views: crop scale needs 0 < min <= max <= 1, got {family.scale}"
                )
            family.scale = (float(low), float(high))
        self._families = families
        self.n_views = sum(len(f.colours) for f in families)
        if self.device_augment and not self.device_supported:
            raise ScratchpathError(
                "views.device_augment: HEStain, saturation and hue run only on the CPU path; "
                "set device_augment: false (or null to choose automatically)"
            )

    @property
    def device_supported(self) -> bool:
        """Whether every augmentation of these views exists on the device path."""
        return all(c.on_device_too for f in self._families for c in f.colours)

    def resolve_device_augment(self, device: torch.device | str) -> bool:
        """Settle ``device_augment=None``: the device path on CUDA (when every augmentation has
        a device version), the CPU path elsewhere. Returns (and keeps) the choice."""
        if self.device_augment is None:
            cuda = torch.device(device).type == "cuda"
            self.device_augment = cuda and self.device_supported
        return bool(self.device_augment)

    @property
    def input_size(self) -> int:
        """Side length of the first (global) views: the input size the backbone trains at."""
        return int(self._families[0].size)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next views belong to (it picks the low-res or the full size)."""
        self._epoch = int(epoch)

    def view_size(self, family: int = 0, epoch: int | None = None) -> int:
        """Side length of ``family``'s views in ``epoch`` (default: the current one)."""
        full = int(self._families[family].size)
        epoch = self._epoch if epoch is None else epoch
        if self.low_res_size is None or epoch >= self.low_res_epochs:
            return full
        return max(1, round(full * self.low_res_size / self.input_size))

    def set_seed(self, seed: int) -> None:
        """Seed the next call (the data module calls this per sample with a derived seed)."""
        self._rng = np.random.default_rng(seed)
        self._py = random.Random(seed)

    def _scale(self, family: int, default: tuple[float, float], tile_px: int):
        if self.crop_microns is None or family != 0:  # µm crops set the first (global) family
            return default
        return augment.micron_crop_scale(self.crop_microns, self.mpp, tile_px)

    # --- CPU path ---------------------------------------------------------------------------
    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        """The CPU-path views of one (H, W, 3) uint8 tile, each a (3, h, w) uint8 tensor."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ScratchpathError(
                f"views: expected an (H, W, 3) uint8 tile, got {image.shape} {image.dtype}"
            )
        views = []
        for index, family in enumerate(self._families):
            scale = self._scale(index, family.scale, min(image.shape[:2]))
            size = self.view_size(index)
            for colour in family.colours:
                key = (size, scale, colour)
                pipeline = self._pipelines.get(key)
                if pipeline is None:
                    pipeline = self._pipelines[key] = _cpu_pipeline(size, scale, colour)
                pipeline.set_random_state(self._rng, self._py)  # one stream: cheap to reseed
                view = pipeline(image=image)["image"]
                views.append(torch.from_numpy(np.stack(cv2.split(view))))  # (3, h, w)
        return views

    def on_device(
        self, views: list[torch.Tensor], generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """CPU-path uint8 (B, 3, h, w) view batches -> float32 views normalised by ``mean`` /
        ``std`` (on whatever device they are). ``generator`` is unused (kept for callers of the
        old signature); the device path is :meth:`device_views`."""
        if len(views) != self.n_views:
            raise ScratchpathError(f"views: expected {self.n_views} view batches, got {len(views)}")
        return [self.normalize(x) for x in views]

    # --- device path ------------------------------------------------------------------------
    def device_views(
        self, tiles: torch.Tensor, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """Every view of a batch of whole tiles, built where ``tiles`` are.

        Args:
            tiles: (B, 3, H, W) uint8 (or float 0..255) tiles on the training device.
            generator: the random stream (the data module seeds one per batch); default one
                per device seeded with ``seed``.

        Returns:
            ``n_views`` float32 (B, 3, h, w) views normalised by ``mean`` / ``std``, in the
            order of the CPU path. No device-to-host synchronisation happens in here.
        """
        if tiles.ndim != 4 or tiles.shape[1] != 3:
            raise ScratchpathError(f"views: expected (B, 3, H, W) tiles, got {tuple(tiles.shape)}")
        g = generator or self._device_generator(tiles.device)
        batch, (height, width) = tiles.shape[0], tiles.shape[2:]
        pixels = tiles.float()
        out: list[torch.Tensor] = []
        for index, family in enumerate(self._families):
            scale = self._scale(index, family.scale, min(height, width))
            count, size = len(family.colours), self.view_size(index)
            boxes = augment.random_resized_boxes(
                count * batch, scale, g, tiles.device, aspect=width / height
            ).view(count, batch, 4)
            elements = torch.randint(0, 8, (count, batch), generator=g, device=tiles.device)
            per = _PerView(family.colours, batch, tiles.device)
            keep = per.where(lambda c: float(c.d4))  # 0: the identity element
            if isinstance(keep, float):
                elements = elements * int(keep)
            else:
                elements = elements * keep.view(count, batch).long()
            crops = augment.resized_crops(pixels, boxes, elements, size)  # (V, B, 3, s, s)
            flat = _colour_on_device(crops.reshape(count * batch, 3, size, size), per, g)
            out += list(self.normalize(flat).view(count, batch, 3, size, size).unbind(0))
        return out

    def augment_views(
        self, views: list[torch.Tensor], generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """The device path's D4 and colour augmentations on views already cropped elsewhere
        (µm-continuous fields of view, :mod:`scratchpath.data.fields`): ``n_views`` uint8 (or
        float 0..255) (B, 3, h, w) batches -> float32 normalised views. No host sync."""
        if len(views) != self.n_views:
            raise ScratchpathError(f"views: expected {self.n_views} view batches, got {len(views)}")
        out: list[torch.Tensor] = []
        start = 0
        for family in self._families:
            count = len(family.colours)
            crops = torch.cat([v.float() for v in views[start : start + count]])  # (V*B, 3, h, w)
            start += count
            batch = crops.shape[0] // count
            g = generator or self._device_generator(crops.device)
            per = _PerView(family.colours, batch, crops.device)
            if per.any(lambda c: c.d4) and crops.shape[-1] == crops.shape[-2]:
                elements = torch.randint(0, 8, (crops.shape[0],), generator=g, device=crops.device)
                keep = per.where(lambda c: float(c.d4))
                elements = elements * (int(keep) if isinstance(keep, float) else keep.long())
                crops = augment.d4_torch(crops, elements)
            flat = _colour_on_device(crops, per, g)
            out += list(self.normalize(flat).view(count, batch, *flat.shape[1:]).unbind(0))
        return out

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or float 0..255) (B, 3, h, w) -> float32 ``(x / 255 - mean) / std``."""
        mean, inv_std = self._normalisation(x.device)
        return (x.float() - mean) * inv_std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Float normalised views back to uint8 (for display)."""
        mean, inv_std = self._normalisation(x.device)
        return (x / inv_std + mean).round().clamp(0, 255).to(torch.uint8)

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Copied to the device once: a host tensor per call would be a blocking copy on CUDA.
        key = str(device)
        if key not in self._constants:
            mean = torch.tensor(self.mean).view(1, 3, 1, 1) * 255
            std = torch.tensor(self.std).view(1, 3, 1, 1) * 255
            self._constants[key] = (mean.to(device), (1 / std).to(device))
        return self._constants[key]

    def _device_generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_generators"] = {}  # torch.Generator does not pickle; rebuilt per process
        state["_constants"] = {}
        return state


class _PerView:
    """Per-sample values of the ``V * B`` samples of one family (view-major), as a Python
    number when all views agree (no tensor at all) or a (V * B,) tensor made on the device."""

    def __init__(self, colours: list[_Colour], batch: int, device: torch.device) -> None:
        self.colours, self.batch, self.device = colours, batch, device
        self.n = len(colours) * batch

    def where(self, value) -> float | torch.Tensor:
        values = [float(value(c)) for c in self.colours]
        if len(set(values)) == 1:
            return values[0]
        return torch.cat([torch.full((self.batch,), v, device=self.device) for v in values])

    def any(self, value) -> bool:
        return any(value(c) for c in self.colours)


def _column(value: float | torch.Tensor, ndim: int) -> float | torch.Tensor:
    return value if isinstance(value, float) else value.view(-1, *([1] * (ndim - 1)))


def _colour_on_device(x: torch.Tensor, per: _PerView, g: torch.Generator) -> torch.Tensor:
    """HED, brightness/contrast, gamma, blur, grayscale, solarisation on float (N, 3, h, w)
    0..255 crops, each with its view's probabilities and ranges (the CPU path's order)."""
    n, dev = x.shape[0], x.device

    def chance(p: float | torch.Tensor) -> torch.Tensor:
        return torch.rand(n, generator=g, device=dev) < p

    def uniform(lo: float | torch.Tensor, hi: float | torch.Tensor) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g, device=dev)

    if per.any(lambda c: c.stain == "hed" and c.hed_strength > 0):
        strength = per.where(lambda c: c.hed_strength if c.stain == "hed" else 0.0)
        u = torch.rand(2, n, 3, generator=g, device=dev)
        apply = chance(per.where(lambda c: c.stain_p))[:, None]
        alpha = torch.where(apply, 1 + _column(strength, 2) * (2 * u[0] - 1), 1.0)
        beta = torch.where(apply, _column(strength, 2) * (2 * u[1] - 1), 0.0)
        x = augment.hed_jitter_float(x, alpha, beta)
    if per.any(lambda c: c.brightness > 0 or c.contrast > 0):
        apply = chance(per.where(lambda c: c.color_p))
        contrast, brightness = per.where(lambda c: c.contrast), per.where(lambda c: c.brightness)
        alpha = torch.where(apply, 1 + uniform(-contrast, contrast), 1.0)
        beta = torch.where(apply, 255 * uniform(-brightness, brightness), 0.0)
        x = augment.brightness_contrast_float(x, alpha, beta)
    if per.any(lambda c: c.gamma > 0):
        gamma = per.where(lambda c: c.gamma)
        apply = chance(per.where(lambda c: c.color_p if c.gamma > 0 else 0.0))
        x = augment.gamma_float(x, torch.where(apply, uniform(1 - gamma, 1 + gamma), 1.0))
    if per.any(lambda c: c.blur_p > 0):
        low, high = per.where(lambda c: c.blur_sigma[0]), per.where(lambda c: c.blur_sigma[1])
        sigma = torch.where(chance(per.where(lambda c: c.blur_p)), uniform(low, high), 0.0)
        max_sigma = max(c.blur_sigma[1] for c in per.colours if c.blur_p > 0)
        x = augment.gaussian_blur_float(x, sigma, max_sigma)
    if per.any(lambda c: c.gray_p > 0):
        x = augment.to_gray_float(x, chance(per.where(lambda c: c.gray_p)))
    if per.any(lambda c: c.solarize_p > 0):
        x = augment.solarize_float(x, chance(per.where(lambda c: c.solarize_p)))
    return x


def _per_view(
    colour: _Colour,
    count: int,
    blur_p: list[float] | None,
    solarize_p: list[float] | None,
    what: str,
) -> list[_Colour]:
    """``count`` colours, with per-view blur / solarisation probabilities where given."""
    for name, values in (("blur_p", blur_p), ("solarize_p", solarize_p)):
        if values is not None and len(values) != count:
            raise ScratchpathError(f"{what}_{name}: needs {count} values, got {len(values)}")
    return [
        replace(
            colour,
            blur_p=colour.blur_p if blur_p is None else float(blur_p[i]),
            solarize_p=colour.solarize_p if solarize_p is None else float(solarize_p[i]),
        )
        for i in range(count)
    ]


class TwoViews(ViewGenerator):
    """Two independent random views of each tile (SimCLR, Chen et al. 2020; MoCo v3, Chen et
    al. 2021).

    Each view: random resized crop (area fraction ``crop_scale``, or a side in µm via
    ``crop_microns`` and the tiles' ``mpp``), D4 (``d4``), stain jitter (``stain``: "hed" =
    Tellez HED jitter of ``hed_strength``, "hestain" = albumentations' ``HEStain``, CPU path
    only, "none"; with probability ``stain_p``), brightness/contrast/saturation/hue/gamma (each
    with probability ``color_p``; saturation and hue only on the CPU path), Gaussian blur
    (``blur_p``, sigma in ``blur_sigma`` px), grayscale (``gray_p``), solarisation
    (``solarize_p``). ``view_blur_p`` / ``view_solarize_p`` (two values) make the views
    asymmetric as in BYOL and MoCo v3 (blur 1.0 / 0.1, solarisation 0 / 0.2).
    ``device_augment`` and progressive resizing (``low_res_size``, ``low_res_epochs``): see
    :class:`ViewGenerator`.
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
        solarize_p: float = 0.0,
        view_blur_p: list[float] | None = None,
        view_solarize_p: list[float] | None = None,
        device_augment: bool | None = None,
        low_res_size: int | None = None,
        low_res_epochs: int = 0,
        seed: int = 0,
    ):
        super().__init__(
            crop_microns=crop_microns, mpp=mpp, device_augment=device_augment,
            low_res_size=low_res_size, low_res_epochs=low_res_epochs, seed=seed,
        )  # fmt: skip
        colour = _Colour(
            d4, stain, hed_strength, stain_p, brightness, contrast, saturation, hue, gamma,
            color_p, blur_p, tuple(blur_sigma), gray_p, solarize_p,
        )  # fmt: skip
        colours = _per_view(colour, 2, view_blur_p, view_solarize_p, "view")
        self._set_families([_Family(output_size, tuple(crop_scale), colours)])


class MultiCrop(ViewGenerator):
    """DINO multi-crop (Caron et al. 2021): ``n_global_crops`` large crops (``global_size`` px,
    area ``global_scale``) followed by ``n_local_crops`` small ones (``local_size``,
    ``local_scale``), all with the colour/geometry augmentations of :class:`TwoViews`.
    ``crop_microns`` (with ``mpp``) sets the global crop side in µm instead of ``global_scale``.
    ``global_blur_p`` / ``global_solarize_p`` (one value per global crop) give DINO's asymmetric
    global crops: blur ``[1.0, 0.1]``, solarisation ``[0.0, 0.2]``; local crops keep ``blur_p``
    (0.5 in the paper) and ``solarize_p``. ``low_res_size`` / ``low_res_epochs``: progressive
    resizing (:class:`ViewGenerator`; the local crops shrink in proportion).
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
        solarize_p: float = 0.0,
        global_blur_p: list[float] | None = None,
        global_solarize_p: list[float] | None = None,
        device_augment: bool | None = None,
        low_res_size: int | None = None,
        low_res_epochs: int = 0,
        seed: int = 0,
    ):
        super().__init__(
            crop_microns=crop_microns, mpp=mpp, device_augment=device_augment,
            low_res_size=low_res_size, low_res_epochs=low_res_epochs, seed=seed,
        )  # fmt: skip
        if n_global_crops < 1 or n_local_crops < 0:
            raise ScratchpathError("MultiCrop: need n_global_crops >= 1 and n_local_crops >= 0")
        colour = _Colour(
            d4, stain, hed_strength, stain_p, brightness, contrast, saturation, hue, gamma,
            color_p, blur_p, tuple(blur_sigma), gray_p, solarize_p,
        )  # fmt: skip
        globals_ = _per_view(colour, n_global_crops, global_blur_p, global_solarize_p, "global")
        families = [_Family(global_size, tuple(global_scale), globals_)]
        if n_local_crops:
            families.append(_Family(local_size, tuple(local_scale), [colour] * n_local_crops))
        self._set_families(families)
        self.n_global_crops = n_global_crops


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
        device_augment: bool | None = None,
        seed: int = 0,
    ):
        super().__init__(
            crop_microns=crop_microns, mpp=mpp, device_augment=device_augment, seed=seed
        )
        colour = _Colour(
            d4=d4, hed_strength=hed_strength, stain_p=1.0, brightness=0.0, contrast=0.0,
            gamma=0.0, color_p=0.0, blur_p=0.0, gray_p=0.0,
        )  # fmt: skip
        self._set_families([_Family(output_size, tuple(crop_scale), [colour])])
