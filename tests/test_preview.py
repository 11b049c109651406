"""``scratchpath preview`` on a small store of real LC25000 tiles."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scratchpath.cli import preview
from scratchpath.cli.preview import HEADER, PAD
from scratchpath.errors import ScratchpathError
from scratchpath.store import PatchStore, import_tiles


@pytest.fixture(scope="module")
def store(tiles_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("preview")
    source = root / "tiles"
    source.mkdir()
    for f in sorted((tiles_dir / "lc25000_lung_224").glob("*/*.jpeg"))[::150]:
        shutil.copy(f, source / f.name)
    import_tiles(source, root / "store", tile_size=224, codec="zstd", mpp=0.5)
    return root / "store"


def main(argv: list[str]) -> int:
    """`scratchpath ARGV` with only this command registered (the full CLI imports every
    command's dependencies, which costs more than these tests)."""
    parser = argparse.ArgumentParser(prog="scratchpath")
    preview.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.run(args)


def _recipe(tmp_path: Path, views: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "data:\n"
        "  class_path: scratchpath.data.PatchDataModule\n"
        "  init_args:\n"
        "    stores: [somewhere]\n"
        f"    views:\n{views}"
    )
    return path


def test_preview_writes_png_of_expected_size(store: Path, tmp_path: Path):
    recipe = _recipe(
        tmp_path,
        "      class_path: scratchpath.views.TwoViews\n"
        "      init_args: {output_size: 96, device_augment: true, hed_strength: 0.2}\n",
    )
    out = tmp_path / "grid.png"
    code = main(["preview", str(store), "--recipe", str(recipe), "--out", str(out), "--n", "3"])
    assert code == 0
    width, height = Image.open(out).size
    # columns: the 224 px original and two 96 px views; rows as tall as the original
    assert (width, height) == (PAD + (224 + PAD) + 2 * (96 + PAD), HEADER + PAD + 3 * (224 + PAD))


def test_preview_first_column_shows_the_store_tiles(store: Path, tmp_path: Path):
    out = tmp_path / "mae.png"
    code = main(["preview", str(store), "--views", "MAEView", "--out", str(out), "--n", "2"])
    assert code == 0
    grid = np.asarray(Image.open(out).convert("RGB"))
    tiles = PatchStore(store).read(range(len(PatchStore(store))))
    shown = grid[HEADER + PAD : HEADER + PAD + 224, PAD : PAD + 224]
    assert any(np.array_equal(shown, tile) for tile in tiles)


def test_preview_shows_every_multicrop_view(store: Path, tmp_path: Path):
    out = tmp_path / "dino.png"
    main(["preview", str(store), "--views", "scratchpath.views.MultiCrop", "--out", str(out),
          "--n", "1"])  # fmt: skip
    width, _ = Image.open(out).size
    assert width == PAD + 3 * (224 + PAD) + 6 * (96 + PAD)  # original, 2 global, 6 local crops


def test_preview_recipe_without_views_is_an_error_naming_the_section(store: Path, tmp_path: Path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("data:\n  init_args:\n    stores: [x]\n")
    with pytest.raises(ScratchpathError, match=r"no data\.init_args\.views"):
        main(["preview", str(store), "--recipe", str(recipe), "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_preview_rejects_a_bad_views_setting_in_one_line(store: Path, tmp_path: Path):
    recipe = _recipe(
        tmp_path,
        "      class_path: scratchpath.views.TwoViews\n      init_args: {stain: purple}\n",
    )
    with pytest.raises(ScratchpathError, match=r"data\.views: .*stain.*purple") as err:
        main(["preview", str(store), "--recipe", str(recipe), "--out", str(tmp_path / "y.png")])
    assert "\n" not in str(err.value)


def test_preview_accepts_the_shipped_flat_recipe_layout(store: Path, tmp_path: Path):
    """LightningCLI recipes may give data's init args directly (no class_path)."""
    recipe = tmp_path / "flat.yaml"
    recipe.write_text(
        "data:\n  stores: [x]\n  views:\n    class_path: scratchpath.views.MAEView\n"
        "    init_args: {output_size: 64}\n"
    )
    out = tmp_path / "flat.png"
    assert (
        main(["preview", str(store), "--recipe", str(recipe), "--out", str(out), "--n", "2"]) == 0
    )
    assert Image.open(out).size == (PAD + (224 + PAD) + (64 + PAD), HEADER + PAD + 2 * (224 + PAD))


def test_every_shipped_recipe_has_views_preview_can_build():
    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        views = preview.load_views_from_recipe(recipe)
        assert views.n_views >= 1, recipe.name
