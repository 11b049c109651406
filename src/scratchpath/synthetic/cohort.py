"""A synthetic cohort with slide-level labels: is there a tumour focus on the slide?

Every slide is a mixed section of stroma, glands and fat (no tumour); a *positive* slide also
holds one tumour focus, a disc of ``focus_um`` µm radius placed inside the tissue. The focus
covers a few percent of the tissue tiles, so averaging all tiles (mean pooling) dilutes it
while attention (ABMIL) can find it: the test of a slide-level head, and the demo's last step.
Slides come in pairs from one *patient* with the same label, so a split must keep patients
whole. Everything follows from the seed.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

from scratchpath.files import atomic_write
from scratchpath.synthetic.render import TISSUE_TYPES, SyntheticSlide
from scratchpath.synthetic.tiff import write_slide

CLASS_NAMES = ("normal", "tumour")
_TUMOUR = TISSUE_TYPES.index("tumour")


class CohortSlide(SyntheticSlide):
    """A mixed slide without tumour, plus one tumour focus of radius ``focus_um`` µm (0: none).

    ``focus`` is ``(x, y, radius)`` in level-0 px, or None: the ground truth of a heatmap.
    """

    def __init__(
        self, width: int, height: int, *, mpp: float, seed: int, focus_um: float = 0.0
    ) -> None:
        super().__init__(width, height, mpp=mpp, tissue="mixed", seed=seed)
        self._types[_TUMOUR] = -20.0  # no tumour anywhere ...
        self.focus: tuple[float, float, float] | None = None
        if focus_um > 0:  # ... but in one disc inside the tissue
            radius = focus_um / (self.step * mpp)  # in field cells
            gh, gw = self._types.shape[1:]
            yy, xx = np.mgrid[0:gh, 0:gw]
            inside = self._outline > radius + 1.0
            inside[: math.ceil(radius), :] = inside[:, : math.ceil(radius)] = False
            inside[gh - math.ceil(radius) - 1 :, :] = inside[:, gw - math.ceil(radius) - 1 :] = (
                False
            )
            cells = np.flatnonzero(inside)
            if not len(cells):
                raise ValueError(f"focus_um: {focus_um} µm does not fit inside the tissue")
            cy, cx = divmod(int(np.random.default_rng([seed, 0xF0C5]).choice(cells)), gw)
            distance = np.hypot(yy - cy, xx - cx)
            disc = np.clip(radius - distance, -1.0, 1.0) * 20.0  # +20 inside, soft edge
            self._types[_TUMOUR] = np.maximum(self._types[_TUMOUR], disc).astype(np.float32)
            step = self.step
            self.focus = ((cx + 0.5) * step - 0.5, (cy + 0.5) * step - 0.5, radius * step)


def write_cohort(
    out_dir: str | os.PathLike,
    n_slides: int = 24,
    *,
    size: tuple[int, int] = (768, 768),
    mpp: float = 1.0,
    focus_um: float = 80.0,
    seed: int = 0,
) -> Path:
    """Write ``n_slides`` pyramidal OME-TIFF slides (half of them positive, in same-label pairs
    per patient) and ``labels.csv`` (``slide,label,patient,focus_x,focus_y,focus_radius``;
    ``slide`` relative to the CSV). Existing slides are kept (they are deterministic).
    Returns the CSV's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width, height = size
    rows = []
    for i in range(n_slides):
        patient = i // 2
        positive = patient % 2 == 1
        name = f"slide_{i:03d}.ome.tif"
        slide = CohortSlide(
            width, height, mpp=mpp, seed=seed * 10_007 + i, focus_um=focus_um if positive else 0.0
        )
        if not (out / name).is_file():
            write_slide(out / name, width, height, mpp=mpp, slide=slide)
        fx, fy, fr = slide.focus or ("", "", "")
        rows.append(
            {
                "slide": name,
                "label": CLASS_NAMES[positive],
                "patient": f"patient_{patient:03d}",
                "focus_x": fx,
                "focus_y": fy,
                "focus_radius": fr,
            }
        )
    labels = out / "labels.csv"
    with atomic_write(labels) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return labels
