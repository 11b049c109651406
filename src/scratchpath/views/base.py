"""``ViewGenerator``: the base of the view generators and its two paths (see the package doc)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch

from scratchpath import augment
from scratchpath.augment import HE_MEAN, HE_STD
from scratchpath.errors import ScratchpathError
from scratchpath.views import apply
from scratchpath.views.config import Colour, Family
from scratchpath.views.params import DrawSpec, draw_params


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
        self._families: list[Family] = []
        self._cpu_only: dict[Colour, tuple[A.Compose | None, A.Compose | None]] = {}
        self._constants: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.set_seed(seed)

    def _set_families(self, families: list[Family]) -> None:
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
        self._spec = DrawSpec.of(self.colours)
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

    @property
    def colours(self) -> list[Colour]:
        """The augmentation settings of every view, in view order."""
        return [c for f in self._families for c in f.colours]

    def _scale(self, family: int, tile_px: int) -> tuple[float, float]:
        if self.crop_microns is None or family != 0:  # µm crops set the first (global) family
            return self._families[family].scale
        return augment.micron_crop_scale(self.crop_microns, self.mpp, tile_px)

    def draw_params(
        self, rngs: Sequence[np.random.Generator], tile_hw: tuple[int, int]
    ) -> np.ndarray:
        """The random parameters of every view of each tile, (V, B, N_PARAMS) float32, each
        tile's from its own generator (:func:`scratchpath.views.params.draw_params`): the one
        draw that both paths use."""
        scales = [
            self._scale(index, min(tile_hw))
            for index, family in enumerate(self._families)
            for _ in family.colours
        ]
        return draw_params(rngs, self._spec, np.array(scales), tile_hw)

    # --- CPU path ---------------------------------------------------------------------------
    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        """The CPU-path views of one (H, W, 3) uint8 tile, each a (3, h, w) uint8 tensor, at
        the parameters of the first draw after :meth:`set_seed`."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ScratchpathError(
                f"views: expected an (H, W, 3) uint8 tile, got {image.shape} {image.dtype}"
            )
        rows = self.draw_params([self._rng], image.shape[:2])[:, 0]  # (V, N_PARAMS)
        views, v = [], 0
        for index, family in enumerate(self._families):
            size = self.view_size(index)
            for colour in family.colours:
                cpu_only = self._cpu_only.get(colour)
                if cpu_only is None:
                    cpu_only = self._cpu_only[colour] = apply.cpu_only_ops(colour)
                for pipeline in cpu_only:
                    if pipeline is not None:  # drawn from the tile's stream, after the rows
                        pipeline.set_random_state(self._rng, self._py)
                view = apply.cpu_view(image, rows[v], size, cpu_only)
                views.append(torch.from_numpy(np.stack(cv2.split(view))))  # (3, h, w)
                v += 1
        return views

    def on_device(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """CPU-path uint8 (B, 3, h, w) view batches -> float32 views normalised by ``mean`` /
        ``std`` (on whatever device they are); the device path is :meth:`device_views`."""
        if len(views) != self.n_views:
            raise ScratchpathError(f"views: expected {self.n_views} view batches, got {len(views)}")
        return [self.normalize(x) for x in views]

    # --- device path ------------------------------------------------------------------------
    def device_views(
        self, tiles: torch.Tensor, params: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Every view of a batch of whole tiles, built where ``tiles`` are.

        Args:
            tiles: (B, 3, H, W) uint8 (or float 0..255) tiles on the training device.
            params: (V, B, N_PARAMS) float32 on the same device, as :meth:`draw_params` made
                them in the data-loader worker (the data module ships them pinned with the
                batch). None (tools, tests): drawn here on the host from the generator's own
                stream (:meth:`set_seed`) and copied over, which a training step never does.

        Returns:
            ``n_views`` float32 (B, 3, h, w) views normalised by ``mean`` / ``std``, in the
            order of the CPU path. No device-to-host synchronisation happens in here.
        """
        if tiles.ndim != 4 or tiles.shape[1] != 3:
            raise ScratchpathError(f"views: expected (B, 3, H, W) tiles, got {tuple(tiles.shape)}")
        batch, tile_hw = tiles.shape[0], tuple(tiles.shape[2:])
        params = self._params_for(params, batch, tile_hw, tiles.device)
        pixels = tiles.float()
        out: list[torch.Tensor] = []
        start = 0
        for index, family in enumerate(self._families):
            count, size = len(family.colours), self.view_size(index)
            rows = params[start : start + count]  # (count, B, N_PARAMS)
            start += count
            crops = apply.device_crops(pixels, rows, size)  # (count, B, 3, s, s)
            flat = apply.device_colour(
                crops.reshape(count * batch, 3, size, size), rows.reshape(count * batch, -1),
                family.colours,
            )  # fmt: skip
            out += list(self.normalize(flat).view(count, batch, 3, size, size).unbind(0))
        return out

    def augment_views(
        self, views: list[torch.Tensor], params: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """The device path's D4 and colour augmentations on views already cropped elsewhere
        (µm-continuous fields of view, :mod:`scratchpath.data.fields`): ``n_views`` uint8 (or
        float 0..255) (B, 3, h, w) batches and their ``params`` (V, B, N_PARAMS) as for
        :meth:`device_views` (crop boxes unused) -> float32 normalised views. No host sync."""
        if len(views) != self.n_views:
            raise ScratchpathError(f"views: expected {self.n_views} view batches, got {len(views)}")
        batch = views[0].shape[0]
        params = self._params_for(params, batch, tuple(views[0].shape[-2:]), views[0].device)
        out: list[torch.Tensor] = []
        start = 0
        for family in self._families:
            count = len(family.colours)
            crops = torch.cat([v.float() for v in views[start : start + count]])  # (V*B, 3, h, w)
            rows = params[start : start + count].reshape(count * batch, -1)
            start += count
            if any(c.d4 for c in family.colours) and crops.shape[-1] == crops.shape[-2]:
                crops = apply.device_d4(crops, rows)
            flat = apply.device_colour(crops, rows, family.colours)
            out += list(self.normalize(flat).view(count, batch, *flat.shape[1:]).unbind(0))
        return out

    def _params_for(
        self,
        params: torch.Tensor | None,
        batch: int,
        tile_hw: tuple[int, int],
        device: torch.device,
    ) -> torch.Tensor:
        if params is None:
            params = torch.from_numpy(self.draw_params([self._rng] * batch, tile_hw)).to(device)
        if tuple(params.shape[:2]) != (self.n_views, batch):
            raise ScratchpathError(
                f"views: params for {tuple(params.shape[:2])} (views, tiles), expected "
                f"{(self.n_views, batch)}"
            )
        return params

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

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_constants"] = {}  # device tensors: rebuilt per process
        state["_cpu_only"] = {}
        return state
