"""slides: levels, µm/px and region reads of the real slides in the shared data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from scratchpath.errors import ScratchpathError
from scratchpath.slides import level_for_mpp, native_within, open_slide
from slide_helpers import reference_window

CMU = "CMU-1-Small-Region.svs"
TCGA = "TCGA-CR-7395-01A-01-TS1.svs"
OME = "CMU-1-Small-Region_derived_pyramid.ome.tif"
PAGES = "CMU-1-Small-Region_derived_pyramid_pages.tif"


def test_aperio_jpeg_svs_has_one_level_at_0_499_mpp(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU) as slide:
        assert slide.vendor == "aperio"
        assert slide.slide_id == "CMU-1-Small-Region"
        assert [(lv.width, lv.height) for lv in slide.levels] == [(2220, 2967)]
        assert slide.mpp == pytest.approx(0.499)


def test_svs_without_mpp_is_refused_in_one_line(slides_dir: Path) -> None:
    with pytest.raises(ScratchpathError) as info:
        open_slide(slides_dir / TCGA)
    message = str(info.value)
    assert message.startswith(f"{slides_dir / TCGA}: ")
    assert "µm/px" in message and "\n" not in message


def test_svs_without_mpp_is_accepted_with_assume_mpp(slides_dir: Path) -> None:
    with open_slide(slides_dir / TCGA, assume_mpp=0.25) as slide:
        assert [(lv.width, lv.height) for lv in slide.levels] == [(4443, 3567), (2221, 1783)]
        assert slide.mpp == 0.25
        assert slide.levels[1].downsample == pytest.approx(2.0, rel=1e-3)
        assert slide.levels[1].mpp == pytest.approx(0.5, rel=1e-3)


def test_mpp_recorded_in_the_file_wins_over_assume_mpp(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU, assume_mpp=2.0) as slide:
        assert slide.mpp == pytest.approx(0.499)


@pytest.mark.parametrize(("name", "vendor"), [(OME, "ome"), (PAGES, "generic-tiff")])
def test_pyramid_has_four_levels_at_doubling_mpp(slides_dir: Path, name: str, vendor: str) -> None:
    with open_slide(slides_dir / name) as slide:
        assert slide.vendor == vendor
        assert len(slide.levels) == 4
        assert [lv.width for lv in slide.levels] == [2220, 1110, 555, 278]
        for k, level in enumerate(slide.levels):
            assert level.mpp == pytest.approx(0.499 * 2**k, rel=2e-3)


# Windows inside one tile, across tile seams, over the right/bottom edge and outside the image.
WINDOWS = [(5, 7, 30, 20), (200, 230, 300, 100), (-40, -10, 100, 60), (2000, 1500, 400, 400)]


@pytest.mark.parametrize(
    ("name", "level"),
    [(CMU, 0), (OME, 0), (OME, 2), (PAGES, 1), (TCGA, 1)],
    ids=["svs-jpeg", "ome-level0", "ome-subifd-level2", "pages-level1", "svs-j2k-level1"],
)
def test_read_region_equals_window_of_fully_decoded_level(
    slides_dir: Path, name: str, level: int
) -> None:
    full = tifffile.imread(slides_dir / name, series=0, level=level)
    with open_slide(slides_dir / name, assume_mpp=0.25) as slide:
        for x, y, w, h in WINDOWS:
            region = slide.read_region(level, x, y, w, h)
            assert region.shape == (h, w, 3) and region.dtype == np.uint8
            np.testing.assert_array_equal(region, reference_window(full, x, y, w, h))


def test_read_region_decodes_only_the_tiles_it_touches(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU) as slide:  # 240×240 JPEG tiles
        slide.read_region(0, 250, 250, 100, 100)  # inside tile (1, 1)
        assert len(slide._cache) == 1
        slide.read_region(0, 230, 230, 20, 20)  # touches tiles (0,0), (0,1), (1,0), (1,1)
        assert len(slide._cache) == 4


def test_region_outside_the_image_is_white(slides_dir: Path) -> None:
    with open_slide(slides_dir / OME) as slide:
        assert (slide.read_region(0, 5000, 5000, 16, 16) == 255).all()


def test_png_region_needs_assume_mpp(slides_dir: Path) -> None:
    path = slides_dir / "regions" / "histolab_tcga-lung-rgb.png"
    with pytest.raises(ScratchpathError, match="no µm/px"):
        open_slide(path)
    with open_slide(path, assume_mpp=0.5) as slide:
        expected = np.asarray(Image.open(path).convert("RGB"))
        assert slide.vendor == "image" and slide.mpp == 0.5
        np.testing.assert_array_equal(slide.read_region(0, 10, 20, 64, 32), expected[20:52, 10:74])


@pytest.mark.parametrize(("unit", "per_unit"), [("CENTIMETER", 1e4), ("INCH", 25400.0)])
def test_tiff_resolution_tags_give_mpp(
    tmp_path: Path, slides_dir: Path, unit: str, per_unit: float
) -> None:
    rgb = np.asarray(Image.open(slides_dir / "regions" / "histolab_tcga-lung-rgb.png"))[..., :3]
    path = tmp_path / "region.tif"
    tifffile.imwrite(
        path,
        rgb,
        tile=(128, 128),
        resolution=(per_unit / 0.25, per_unit / 0.25),
        resolutionunit=unit,
    )
    with open_slide(path) as slide:
        assert slide.vendor == "generic-tiff"
        assert slide.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(slide.read_level(0), rgb)


def test_thumbnail_fits_max_size_and_reports_scale(slides_dir: Path) -> None:
    with open_slide(slides_dir / OME) as slide:
        thumb, scale = slide.thumbnail(max_size=300)
        assert max(thumb.shape[:2]) == 300 and thumb.shape[2] == 3
        assert scale == pytest.approx(2220 / thumb.shape[1])
        # Built from level 3 (371 px high): same colours as the level itself, on average.
        level3 = slide.read_level(3).astype(float).mean(axis=(0, 1))
        np.testing.assert_allclose(thumb.astype(float).mean(axis=(0, 1)), level3, atol=2.0)


def test_level_for_mpp_picks_the_coarsest_level_not_coarser_than_target(slides_dir: Path) -> None:
    with open_slide(slides_dir / OME) as slide:
        assert level_for_mpp(slide, 1.0).index == 1  # 0.998: within 5 %
        assert native_within(level_for_mpp(slide, 1.0), 1.0)
        assert level_for_mpp(slide, 1.5).index == 1  # 1.996 would need upsampling
        assert not native_within(level_for_mpp(slide, 1.5), 1.5)
        assert level_for_mpp(slide, 10.0).index == 3
        with pytest.raises(ScratchpathError, match="coarser than the target"):
            level_for_mpp(slide, 0.25)


def _truncated(src: Path, dst: Path) -> None:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])


def _truncated_ome(src: Path, dst: Path) -> None:
    # The OME pyramid keeps its directories at the start: they survive, the tile data does not.
    _truncated(src.with_name(OME), dst)


def _bad_header(src: Path, dst: Path) -> None:
    data = bytearray(src.read_bytes())
    data[4:8] = b"\xff\xff\xff\x7f"  # first IFD offset points past the end of the file
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda src, dst: None, "no such file"),
        (lambda src, dst: dst.write_bytes(b""), "empty file"),
        (lambda src, dst: dst.write_text("not a slide\n"), "not a TIFF"),
        (_truncated, "truncated or damaged"),
        (_truncated_ome, "tile data past end of file"),
        (_bad_header, "truncated or damaged"),
    ],
    ids=["missing", "empty", "text-file", "truncated-svs", "truncated-ome", "bad-header"],
)
def test_bad_file_gives_one_line_error_naming_it(
    tmp_path: Path, slides_dir: Path, make, reason: str
) -> None:
    path = tmp_path / "bad.svs"
    make(slides_dir / CMU, path)
    with pytest.raises(ScratchpathError) as info:
        open_slide(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and reason in message and "\n" not in message
