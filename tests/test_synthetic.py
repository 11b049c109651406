"""The synthetic H&E generator: files the slide reader accepts, morphology, streaming writes."""

from __future__ import annotations

import csv
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from scratchpath.slides import open_slide
from scratchpath.synthetic import (
    TISSUE_TYPES,
    SyntheticSlide,
    pyramid_shapes,
    write_slide,
    write_tile_set,
)
from scratchpath.synthetic import tiff as synthetic_tiff
from scratchpath.tissue import tissue_mask

WIDTH, HEIGHT = 1300, 900  # odd pyramid sizes on purpose (650x450, 325x225)


@pytest.fixture(scope="module")
def ome_slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "mixed.ome.tif"
    return write_slide(path, WIDTH, HEIGHT, mpp=0.5, tissue="mixed", seed=7)


def test_reader_gets_the_mpp_and_levels_written(ome_slide):
    with open_slide(ome_slide) as slide:
        assert slide.vendor == "ome"
        assert slide.mpp == pytest.approx(0.5, rel=1e-6)
        sizes = [(level.height, level.width) for level in slide.levels]
        assert sizes == pyramid_shapes(WIDTH, HEIGHT)
        for level in slide.levels:
            assert level.mpp == pytest.approx(0.5 * level.downsample, rel=1e-2)


def test_plain_tiff_pages_pyramid_reads_with_resolution_mpp(tmp_path):
    path = write_slide(tmp_path / "pages.tif", 700, 600, mpp=0.25, tissue="stroma", seed=1)
    with open_slide(path) as slide:
        assert slide.vendor != "ome"
        assert slide.mpp == pytest.approx(0.25, rel=1e-6)
        assert [(lv.height, lv.width) for lv in slide.levels] == pyramid_shapes(700, 600)


def test_jpeg_region_equals_the_rendered_pixels_within_jpeg_loss(ome_slide):
    expected = SyntheticSlide(WIDTH, HEIGHT, mpp=0.5, tissue="mixed", seed=7).render(
        300, 200, 400, 300
    )
    with open_slide(ome_slide) as slide:
        read = slide.read_region(0, 300, 200, 400, 300)
    error = np.abs(read.astype(np.int16) - expected)
    assert error.mean() < 4.0  # JPEG q90, 4:2:0 chroma
    assert np.percentile(error, 99) < 40


def test_zstd_region_equals_the_rendered_pixels_to_rounding(tmp_path):
    path = write_slide(tmp_path / "lossless.ome.tif", 600, 500, seed=3, compression="zstd")
    expected = SyntheticSlide(600, 500, seed=3).render(130, 70, 300, 260)
    with open_slide(path) as slide:
        error = np.abs(slide.read_region(0, 130, 70, 300, 260).astype(np.int16) - expected)
    # Lossless: only float rounding of a region rendered at another origin (±1, rare) differs.
    assert error.max() <= 1 and (error > 0).mean() < 1e-3


def test_reduced_levels_are_2x_area_averages_of_level_0(tmp_path):
    path = write_slide(tmp_path / "pyramid.ome.tif", 1024, 768, seed=5, compression="zstd")
    with open_slide(path) as slide:
        full = slide.read_region(0, 0, 0, 1024, 768)
        half = slide.read_region(1, 0, 0, 512, 384)
    expected = cv2.resize(full, (512, 384), interpolation=cv2.INTER_AREA)
    assert np.abs(half.astype(np.int16) - expected).max() <= 1


def test_tissue_detector_finds_the_outline_and_the_glass(ome_slide):
    with open_slide(ome_slide) as slide:
        thumb, downsample = slide.thumbnail(256)
    detected = tissue_mask(thumb)
    model = SyntheticSlide(WIDTH, HEIGHT, mpp=0.5, tissue="mixed", seed=7)
    ys, xs = np.mgrid[0 : thumb.shape[0], 0 : thumb.shape[1]]
    truth = model.in_tissue((xs + 0.5) * downsample, (ys + 0.5) * downsample)
    agreement = (detected == truth).mean()
    assert 0.1 < truth.mean() < 0.95  # the slide has both tissue and glass
    assert agreement > 0.85


# Ruifrok & Johnston (2001) H, E, DAB optical-density vectors: a fixed reference, not the
# generator's own (jittered) stain vectors, as a pathologist's colour deconvolution would use.
_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_OD_TO_HED = np.linalg.inv(_HED / np.linalg.norm(_HED, axis=1, keepdims=True))


def _morphology(rgb: np.ndarray) -> tuple[float, float]:
    """Nuclear area fraction (haematoxylin by colour deconvolution) and empty-space fraction."""
    od = -np.log(np.maximum(rgb.astype(np.float64), 1.0) / 255.0)
    haematoxylin = (od.reshape(-1, 3) @ _RGB_FROM_OD_TO_HED)[:, 0]
    empty = rgb.mean(-1) > 215  # lumina, fat vacuoles
    return float((haematoxylin > 0.5).mean()), float(empty.mean())


def test_tissue_types_differ_in_morphology_not_only_colour():
    """Nuclear area and empty space (lumina, fat) separate the four types on every seed.

    Stain profiles are drawn per seed independently of the tissue type, so the statistics are
    compared across differently stained slides.
    """
    nuclear = {name: [] for name in TISSUE_TYPES}
    empty = {name: [] for name in TISSUE_TYPES}
    for seed in range(3):
        for name in TISSUE_TYPES:
            model = SyntheticSlide(2048, 2048, mpp=0.5, tissue=name, seed=seed, outline=False)
            n, e = _morphology(model.render(512, 512, 512, 512))
            nuclear[name].append(n)
            empty[name].append(e)
    others = [v for name in ("stroma", "glandular", "adipose") for v in nuclear[name]]
    assert min(nuclear["tumour"]) > 5 * max(others)  # crowded nuclei
    assert min(empty["adipose"]) > 0.5 > max(empty["glandular"])  # fat vacuoles
    assert min(empty["glandular"]) > 0.01  # gland lumina ...
    assert max(empty["stroma"] + empty["tumour"]) < 0.2 * min(empty["glandular"])  # ... only
    assert min(nuclear["stroma"]) > max(nuclear["adipose"])  # fibroblasts vs rare adipocytes


def test_synthetic_colours_lie_within_real_he_tiles(tiles_dir):
    """Per-tile mean RGB of synthetic tissue falls inside the range of real H&E tiles."""
    real = []
    for path in sorted((tiles_dir / "deeptexture_examples_unlabeled_256").rglob("*.jp*g")):
        real.append(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB).mean((0, 1)))
    real = np.array(real)
    assert len(real) >= 100
    low, high = real.min(0), real.max(0)
    for seed in range(2):
        for name in ("tumour", "stroma", "glandular"):
            model = SyntheticSlide(1024, 1024, tissue=name, seed=seed, outline=False)
            mean = model.render(256, 256, 256, 256).mean((0, 1))
            assert np.all(mean >= low - 5) and np.all(mean <= high + 5), (name, mean, low, high)


def test_tile_set_has_class_folders_and_grouped_labels(tmp_path):
    labels = write_tile_set(tmp_path / "tiles", n_per_class=5, size=96, seed=0, tiles_per_group=2)
    with open(labels, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * len(TISSUE_TYPES)
    assert {r["label"] for r in rows} == set(TISSUE_TYPES)
    for name in TISSUE_TYPES:
        groups = {r["group"] for r in rows if r["label"] == name}
        assert len(groups) == 3  # 5 tiles, 2 per group
    for row in rows[:: len(TISSUE_TYPES)]:
        assert row["path"].startswith(row["label"] + "/")
        tile = cv2.imread(str(labels.parent / row["path"]))
        assert tile.shape == (96, 96, 3)


def test_regions_join_without_seams():
    model = SyntheticSlide(2000, 2000, tissue="glandular", seed=4, outline=False)
    whole = model.render(700, 700, 300, 300).astype(np.int16)
    parts = [[model.render(700 + x, 700 + y, 150, 150) for x in (0, 150)] for y in (0, 150)]
    joined = np.concatenate([np.concatenate(row, axis=1) for row in parts], axis=0)
    assert np.abs(joined.astype(np.int16) - whole).max() <= 2  # float rounding only


def test_large_slide_is_streamed_tile_row_by_tile_row(tmp_path, monkeypatch):
    """8192x8192 (192 MiB of RGB) is written while Python holds far less than the image.

    Rendering is replaced by a cheap coordinate pattern so the test measures the writer's
    streaming (tile iterator + on-disk pyramid staging), not the tissue renderer.
    """
    size = 8192
    calls = []

    def pattern(self, x, y, width, height):
        calls.append((width, height))
        ys, xs = np.ogrid[y : y + height, x : x + width]
        out = np.empty((height, width, 3), np.uint8)
        out[..., 0], out[..., 1] = (xs // 64) % 256, (ys // 64) % 256
        out[..., 2] = ((xs + ys) // 512) % 256
        return out

    monkeypatch.setattr(SyntheticSlide, "render", pattern)
    tracemalloc.start()
    try:
        path = write_slide(tmp_path / "big.ome.tif", size, size, seed=0, quality=95)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full_image = size * size * 3
    # A few tile rows (8192x256 px = 6 MiB each) are alive at once, never the image.
    assert peak < full_image / 6, f"peak {peak / 2**20:.0f} MiB"
    assert (
        max(h for _, h in calls) <= 256 and max(w for w, _ in calls) <= synthetic_tiff._BLOCK_WIDTH
    )
    with open_slide(path) as slide:
        assert (slide.levels[0].width, slide.levels[0].height) == (size, size)
        region = slide.read_region(0, 5000, 7000, 64, 64)
        expected = pattern(None, 5000, 7000, 64, 64)
        assert np.abs(region.astype(np.int16) - expected).mean() < 3
        assert len(slide.levels) == len(pyramid_shapes(size, size))


def test_synth_command_writes_readable_slides_and_labelled_tiles(tmp_path, capsys):
    from scratchpath.cli import main

    status = main(["synth", "--out", str(tmp_path), "--slides", "2", "--size", "600x400",
                   "--mpp", "0.25", "--tiles-per-class", "2", "--tile-size", "64"])  # fmt: skip
    assert status == 0
    slides = sorted((tmp_path / "slides").glob("*.ome.tif"))
    assert [p.name for p in slides] == [
        "synthetic_000_mixed.ome.tif",
        "synthetic_001_tumour.ome.tif",
    ]
    with open_slide(slides[1]) as slide:
        assert (slide.levels[0].width, slide.levels[0].height) == (600, 400)
        assert slide.mpp == pytest.approx(0.25)
    with open(tmp_path / "tiles" / "labels.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * len(TISSUE_TYPES)
    assert "labels.csv" in capsys.readouterr().out


def test_synth_command_rejects_an_unknown_tissue(tmp_path, capsys):
    from scratchpath.cli import main

    assert main(["synth", "--out", str(tmp_path), "--tissue", "bone"]) == 2
    assert "--tissue" in capsys.readouterr().err
