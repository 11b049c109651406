"""View generators on real H&E tiles: shapes, seeding, pickling, device path, recipe binding."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scratchpath.errors import ScratchpathError
from scratchpath.views import MAEView, MultiCrop, TwoViews


@pytest.fixture(scope="module")
def tiles(tiles_dir: Path) -> list[np.ndarray]:
    deeptexture = sorted((tiles_dir / "deeptexture_examples_unlabeled_256" / "unlabeled").glob("*"))
    lung = sorted((tiles_dir / "lc25000_lung_224").glob("*/*.jpeg"))
    return [np.asarray(Image.open(f).convert("RGB")) for f in deeptexture[:3] + lung[::250]]


def _views(generator, tile: np.ndarray, seed: int) -> list[torch.Tensor]:
    generator.set_seed(seed)
    return generator(tile)


@pytest.mark.parametrize(
    ("generator", "shapes"),
    [
        (TwoViews(output_size=128), [(3, 128, 128)] * 2),
        (
            MultiCrop(global_size=96, local_size=48, n_local_crops=3),
            [(3, 96, 96)] * 2 + [(3, 48, 48)] * 3,
        ),
        (MAEView(output_size=112), [(3, 112, 112)]),
        (TwoViews(output_size=64, device_augment=True), [(3, 64, 64)] * 2),
    ],
    ids=["two", "multicrop", "mae", "two-device"],
)
def test_view_shapes_dtype_and_count(generator, shapes, tiles):
    for tile in tiles:
        views = _views(generator, tile, 0)
        assert [tuple(v.shape) for v in views] == shapes
        assert all(v.dtype == torch.uint8 for v in views)
    assert generator.n_views == len(shapes)


def test_multicrop_puts_global_crops_first(tiles):
    generator = MultiCrop(global_size=96, local_size=32, n_global_crops=2, n_local_crops=4)
    sizes = [v.shape[-1] for v in _views(generator, tiles[0], 1)]
    assert sizes == [96, 96, 32, 32, 32, 32] and generator.n_global_crops == 2


@pytest.mark.parametrize("cls", [TwoViews, MultiCrop, MAEView])
def test_same_seed_same_views_different_seed_different(cls, tiles):
    generator = cls()
    a, b, c = (_views(generator, tiles[1], s) for s in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_two_views_of_one_tile_differ(tiles):
    first, second = _views(TwoViews(output_size=96), tiles[0], 3)
    assert not torch.equal(first, second)


def test_views_survive_pickling_with_identical_output(tiles):
    generator = MultiCrop(global_size=64, local_size=32, n_local_crops=2, device_augment=True)
    generator.on_device(
        [torch.zeros(1, 3, 64, 64, dtype=torch.uint8)] * 2
        + [torch.zeros(1, 3, 32, 32, dtype=torch.uint8)] * 2
    )
    clone = pickle.loads(pickle.dumps(generator))  # after a torch.Generator was created
    for a, b in zip(_views(generator, tiles[2], 4), _views(clone, tiles[2], 4), strict=True):
        assert torch.equal(a, b)


def test_on_device_only_normalises_without_device_augment(tiles):
    generator = TwoViews(output_size=64)
    views = [v[None] for v in _views(generator, tiles[0], 0)]
    out = generator.on_device(views)
    assert all(o.dtype == torch.float32 for o in out)
    mean = torch.tensor(generator.mean).view(1, 3, 1, 1)
    std = torch.tensor(generator.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out[0], (views[0].float() / 255 - mean) / std, atol=1e-5, rtol=0)
    assert torch.equal(generator.denormalize(out[1]), views[1])


def test_device_augment_cpu_side_is_crop_only(tiles):
    """With device_augment the CPU returns the plain crop: no colour change yet."""
    cpu_only = TwoViews(output_size=224, crop_scale=(1.0, 1.0), device_augment=True)
    tile = tiles[3]  # 224x224 LC25000 tile: a full-area crop is the tile itself
    for view in _views(cpu_only, tile, 0):
        assert np.array_equal(view.permute(1, 2, 0).numpy(), tile)


def test_device_augment_applies_augmentations_on_device(tiles):
    generator = TwoViews(output_size=224, crop_scale=(1.0, 1.0), device_augment=True)
    views = [v[None] for v in _views(generator, tiles[3], 0)]
    out = generator.on_device(views, generator=torch.Generator().manual_seed(0))
    changed = [
        not torch.equal(generator.denormalize(o), v) for o, v in zip(out, views, strict=True)
    ]
    assert any(changed)


def test_device_path_matches_cpu_path_in_distribution(tiles):
    """Mean and spread of per-view channel means agree between CPU and device pipelines."""
    tile, n = tiles[0], 120
    kwargs = dict(output_size=64, crop_scale=(0.3, 1.0), hed_strength=0.2, gray_p=0.2)
    cpu, dev = TwoViews(**kwargs), TwoViews(**kwargs, device_augment=True)
    cpu_means, crops = [], []
    for seed in range(n // 2):
        cpu_means += [v.float().mean((1, 2)) for v in _views(cpu, tile, seed)]
        crops += _views(dev, tile, seed)
    batch = torch.stack(crops)
    out = dev.on_device(
        [batch[: n // 2], batch[n // 2 :]], generator=torch.Generator().manual_seed(1)
    )
    dev_means = dev.denormalize(torch.cat(out)).float().mean((2, 3))
    cpu_means = torch.stack(cpu_means)
    spread = cpu_means.std(0)
    assert torch.all((cpu_means.mean(0) - dev_means.mean(0)).abs() < 0.35 * spread)
    torch.testing.assert_close(dev_means.std(0), spread, rtol=0.3, atol=0)


def test_hestain_is_selectable(tiles):
    generator = TwoViews(output_size=64, stain="hestain", stain_p=1.0)
    assert len(_views(generator, tiles[0], 0)) == 2


def test_micron_crop_needs_mpp(tiles):
    with pytest.raises(ScratchpathError, match="mpp"):
        _views(TwoViews(output_size=64, crop_microns=(20.0, 60.0)), tiles[0], 0)


def test_micron_crop_gives_requested_output_size(tiles):
    generator = TwoViews(output_size=64, crop_microns=(20.0, 60.0), mpp=0.5)
    assert [tuple(v.shape) for v in _views(generator, tiles[0], 0)] == [(3, 64, 64)] * 2


def test_rejects_a_non_rgb_tile():
    with pytest.raises(ScratchpathError, match="uint8"):
        TwoViews()(np.zeros((32, 32), dtype=np.uint8))


def test_recipe_style_config_instantiates_a_view_generator():
    from jsonargparse import ArgumentParser

    from scratchpath.views import ViewGenerator

    parser = ArgumentParser()
    parser.add_argument("--views", type=ViewGenerator)
    config = {
        "views": {
            "class_path": "scratchpath.views.MultiCrop",
            "init_args": {"n_local_crops": 4, "global_scale": [0.4, 1.0], "stain": "none"},
        }
    }
    views = parser.instantiate(parser.parse_object(config)).views
    assert isinstance(views, MultiCrop) and views.n_views == 6


def test_saturation_hue_jitter_stays_on_cpu_with_device_augment(tiles):
    """ColorJitter has no torch twin, so the CPU applies it even when device_augment is set."""
    generator = TwoViews(
        output_size=224, crop_scale=(1.0, 1.0), saturation=0.5, hue=0.1, color_p=1.0,
        device_augment=True,
    )  # fmt: skip
    views = _views(generator, tiles[3], 0)
    assert not np.array_equal(views[0].permute(1, 2, 0).numpy(), tiles[3])


def test_on_device_rejects_the_wrong_number_of_view_batches():
    generator = MultiCrop(n_local_crops=2)
    with pytest.raises(ScratchpathError, match="expected 4 view batches"):
        generator.on_device([torch.zeros(1, 3, 8, 8, dtype=torch.uint8)] * 3)
