"""The view generators: two views (SimCLR, MoCo v3), multi-crop (DINO, DINOv2), one MAE view."""

from __future__ import annotations

from scratchpath.errors import ScratchpathError
from scratchpath.views.base import ViewGenerator
from scratchpath.views.config import Colour, Family, StainMode, per_view


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
        colour = Colour(
            d4, stain, hed_strength, stain_p, brightness, contrast, saturation, hue, gamma,
            color_p, blur_p, tuple(blur_sigma), gray_p, solarize_p,
        )  # fmt: skip
        colours = per_view(colour, 2, view_blur_p, view_solarize_p, "view")
        self._set_families([Family(output_size, tuple(crop_scale), colours)])


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
        colour = Colour(
            d4, stain, hed_strength, stain_p, brightness, contrast, saturation, hue, gamma,
            color_p, blur_p, tuple(blur_sigma), gray_p, solarize_p,
        )  # fmt: skip
        globals_ = per_view(colour, n_global_crops, global_blur_p, global_solarize_p, "global")
        families = [Family(global_size, tuple(global_scale), globals_)]
        if n_local_crops:
            families.append(Family(local_size, tuple(local_scale), [colour] * n_local_crops))
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
        colour = Colour(
            d4=d4, hed_strength=hed_strength, stain_p=1.0, brightness=0.0, contrast=0.0,
            gamma=0.0, color_p=0.0, blur_p=0.0, gray_p=0.0,
        )  # fmt: skip
        self._set_families([Family(output_size, tuple(crop_scale), [colour])])
