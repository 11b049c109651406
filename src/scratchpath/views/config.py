"""What the views of a generator are made of: per view, its crop family and its colour settings."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from scratchpath.errors import ScratchpathError

StainMode = Literal["hed", "hestain", "none"]


@dataclass(frozen=True)
class Colour:
    """Geometry and colour augmentations applied after the crop (shared by all view kinds)."""

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

    @property
    def hed(self) -> bool:
        return self.stain == "hed" and self.hed_strength > 0

    @property
    def brightness_contrast(self) -> bool:
        return self.brightness > 0 or self.contrast > 0


@dataclass
class Family:
    """Views of one output size and crop scale; ``colours`` has one entry per view (they differ
    only for asymmetric augmentation, e.g. DINO's two global crops)."""

    size: int
    scale: tuple[float, float]
    colours: list[Colour]


def per_view(
    colour: Colour,
    count: int,
    blur_p: list[float] | None,
    solarize_p: list[float] | None,
    what: str,
) -> list[Colour]:
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
