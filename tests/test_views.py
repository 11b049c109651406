"""View generators on real H&E tiles: shapes, seeding, pickling, the device path (geometry
exactness, the same views as the CPU path at the same parameter draw, asymmetric DINO crops, no
host sync or host-made tensor), recipe binding; and a test of the path-agreement check itself."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scratchpath.augment import D4_ELEMENTS, d4_numpy, kernels
from scratchpath.errors import ScratchpathError
from scratchpath.views import MAEView, MultiCrop, TwoViews
from scratchpath.views import params as P


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
        (MultiCrop(global_size=64, n_local_crops=0), [(3, 64, 64)] * 2),
    ],
    ids=["two", "multicrop", "mae", "two-device", "globals-only"],
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


def test_low_res_views_until_low_res_epochs_then_the_full_size(tiles):
    generator = TwoViews(output_size=96, low_res_size=64, low_res_epochs=2, device_augment=False)
    sides = []
    for epoch in range(4):
        generator.set_epoch(epoch)
        sides.append([v.shape[-1] for v in _views(generator, tiles[0], 0)])
    assert sides == [[64, 64], [64, 64], [96, 96], [96, 96]]
    assert generator.input_size == 96  # what export and eval use: the size it finishes at


def test_device_views_shrink_local_crops_in_proportion_while_low_res(tiles):
    generator = MultiCrop(global_size=96, local_size=48, n_local_crops=2, device_augment=True,
                          low_res_size=64, low_res_epochs=1)  # fmt: skip
    early = [v.shape[-1] for v in generator.device_views(_batch(tiles[:2]))]
    generator.set_epoch(1)
    late = [v.shape[-1] for v in generator.device_views(_batch(tiles[:2]))]
    assert early == [64, 64, 32, 32] and late == [96, 96, 48, 48]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"low_res_epochs": 3},
        {"low_res_size": 0, "low_res_epochs": 1},
        {"low_res_size": 32, "low_res_epochs": -1},
    ],
    ids=["epochs-without-size", "zero-size", "negative-epochs"],
)
def test_invalid_progressive_resizing_is_a_clear_error(kwargs):
    with pytest.raises(ScratchpathError, match="low_res"):
        TwoViews(output_size=64, **kwargs)


def test_two_views_of_one_tile_differ(tiles):
    first, second = _views(TwoViews(output_size=96), tiles[0], 3)
    assert not torch.equal(first, second)


def test_views_survive_pickling_with_identical_output(tiles):
    generator = MultiCrop(global_size=64, local_size=32, n_local_crops=2, device_augment=True)
    generator.device_views(_batch(tiles[3:4]))  # caches device constants
    clone = pickle.loads(pickle.dumps(generator))
    for a, b in zip(_views(generator, tiles[2], 4), _views(clone, tiles[2], 4), strict=True):
        assert torch.equal(a, b)


def test_on_device_only_normalises_cpu_path_views(tiles):
    generator = TwoViews(output_size=64)
    views = [v[None] for v in _views(generator, tiles[0], 0)]
    out = generator.on_device(views)
    assert all(o.dtype == torch.float32 for o in out)
    mean = torch.tensor(generator.mean).view(1, 3, 1, 1)
    std = torch.tensor(generator.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out[0], (views[0].float() / 255 - mean) / std, atol=1e-5, rtol=0)
    assert torch.equal(generator.denormalize(out[1]), views[1])


def _batch(tiles: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


NO_COLOUR = dict(hed_strength=0.0, brightness=0.0, contrast=0.0, gamma=0.0, blur_p=0.0, gray_p=0.0)


@pytest.mark.parametrize(
    ("generator", "shapes"),
    [
        (TwoViews(output_size=64, device_augment=True), [(3, 3, 64, 64)] * 2),
        (
            MultiCrop(
                global_size=64, local_size=32, n_local_crops=3, device_augment=True,
                global_blur_p=[1.0, 0.1], global_solarize_p=[0.0, 0.2],
            ),
            [(3, 3, 64, 64)] * 2 + [(3, 3, 32, 32)] * 3,
        ),
        (MAEView(output_size=48, device_augment=True), [(3, 3, 48, 48)]),
    ],
    ids=["two", "multicrop", "mae"],
)  # fmt: skip
def test_device_views_of_every_kind_are_float_normalised_batches(generator, shapes, tiles):
    generator.set_seed(0)
    out = generator.device_views(_batch(tiles[3:6]))
    assert [tuple(v.shape) for v in out] == shapes
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in out)
    assert not torch.equal(out[0][0], out[0][1])  # other tiles
    assert len(out) == 1 or not torch.equal(out[0], out[1])  # other random views


def test_device_full_crop_without_augmentation_is_the_tile(tiles):
    """A whole-tile crop resized to the tile size samples every pixel centre: the identity."""
    generator = TwoViews(output_size=224, crop_scale=(1.0, 1.0), d4=False, **NO_COLOUR)
    batch = _batch(tiles[3:5])
    for view in generator.device_views(batch):
        assert torch.equal(generator.denormalize(view), batch)


def test_device_d4_gives_each_drawn_symmetry_exactly(tiles):
    """A whole-tile crop with the drawn D4 element k is exactly element k of the tile (the
    numbering of D4_ELEMENTS / A.D4), and all 8 elements occur."""
    generator = TwoViews(output_size=224, crop_scale=(1.0, 1.0), d4=True, **NO_COLOUR)
    batch = _batch(tiles[3:4]).expand(32, -1, -1, -1)
    rngs = [np.random.default_rng(s) for s in range(32)]
    params = generator.draw_params(rngs, (224, 224))
    views = generator.device_views(batch, torch.from_numpy(params))
    for v, view in enumerate(views):
        for i in range(32):
            element = int(params[v, i, P.D4])
            expected = torch.from_numpy(d4_numpy(tiles[3], element)).permute(2, 0, 1)
            assert torch.equal(generator.denormalize(view[i : i + 1])[0], expected), element
    assert set(params[..., P.D4].astype(int).ravel()) == set(range(len(D4_ELEMENTS)))


def test_device_micron_crops_use_the_store_resolution(tiles):
    # 112 µm at 0.5 µm/px is the whole 224 px tile: the identity again, whatever crop_scale says.
    generator = TwoViews(
        output_size=224, crop_scale=(0.2, 0.3), crop_microns=(112.0, 112.0), mpp=0.5, d4=False,
        **NO_COLOUR,
    )  # fmt: skip
    batch = _batch(tiles[3:4])
    assert torch.equal(generator.denormalize(generator.device_views(batch)[0]), batch)


def test_device_augmentations_change_the_views(tiles):
    generator = TwoViews(output_size=224, crop_scale=(1.0, 1.0), d4=False, device_augment=True)
    batch = _batch(tiles[3:4]).expand(8, -1, -1, -1)
    generator.set_seed(0)
    out = generator.device_views(batch)
    changed = [
        not torch.equal(generator.denormalize(o[i : i + 1]), batch[:1])
        for o in out
        for i in range(8)
    ]
    assert sum(changed) >= 12  # colour p 0.8, stain p 0.8, blur 0.5: almost every view changes


# Strong settings, so that a wrong device path shows: HED on every view, blur on half of them.
AGREEMENT = dict(
    output_size=64, crop_scale=(0.3, 1.0), hed_strength=0.3, stain_p=1.0, blur_p=0.5,
    blur_sigma=(0.5, 2.0), gray_p=0.1, solarize_p=0.1,
)  # fmt: skip


def check_paths_agree(tiles: list[np.ndarray], seeds: range = range(4)) -> None:
    """The device path's views equal the CPU path's at the same parameter draw (same tile,
    same seed), up to the CPU path's rounding after each op: per view, mean |difference| below
    1.5 grey levels and no pixel off by more than 6."""
    cpu, device = TwoViews(**AGREEMENT, device_augment=False), TwoViews(**AGREEMENT)
    samples = [(tile, seed) for tile in tiles for seed in seeds]
    rngs = [np.random.default_rng(seed) for _, seed in samples]
    params = device.draw_params(rngs, tiles[0].shape[:2])
    made = device.device_views(_batch([t for t, _ in samples]), torch.from_numpy(params))
    made = [device.denormalize(v).float() for v in made]
    worst_mean, worst_pixel = 0.0, 0.0
    for i, (tile, seed) in enumerate(samples):
        cpu.set_seed(seed)
        for v, view in enumerate(cpu(tile)):
            difference = (made[v][i] - view.float()).abs()
            worst_mean = max(worst_mean, float(difference.mean()))
            worst_pixel = max(worst_pixel, float(difference.max()))
    assert worst_mean < 1.5 and worst_pixel <= 6, (worst_mean, worst_pixel)


def test_device_views_equal_cpu_views_at_the_same_draw(tiles):
    check_paths_agree(tiles[3:9])


DEVICE_MUTATIONS = {  # broken device paths: (kernel, how it is broken)
    "hed-strength-x0.5": ("hed_jitter_float",
                          lambda f: lambda x, a, b, *r: f(x, 1 + (a - 1) / 2, b / 2, *r)),
    "blur-sigma-x4": ("gaussian_blur_float", lambda f: lambda x, s, m: f(x, s * 4, m * 4)),
    "blur-never-applied": ("gaussian_blur_float", lambda f: lambda x, s, m: x.float()),
    "d4-off": ("resized_crops", lambda f: lambda t, b, e, size: f(t, b, e * 0, size)),
}  # fmt: skip


@pytest.mark.parametrize("mutation", sorted(DEVICE_MUTATIONS))
def test_path_agreement_check_fails_for_a_broken_device_path(mutation, tiles, monkeypatch):
    """A test of the test above: each broken device path must make it fail."""
    name, broken = DEVICE_MUTATIONS[mutation]
    monkeypatch.setattr(kernels, name, broken(getattr(kernels, name)))
    with pytest.raises(AssertionError):
        check_paths_agree(tiles[3:9])


def test_device_batch_transfer_makes_no_host_tensor_and_no_sync(tiles):
    """With the parameters shipped in the (pinned) batch, building the views makes no tensor
    from host data (``aten.lift_fresh``: on a GPU a pageable copy) and no sync; without them
    (tools) the host draw shows up as such a tensor, so the count can fail."""
    from scratchpath.data.module import PatchDataModule
    from test_sync import SyncCounter

    class Counter(SyncCounter):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.lift_fresh.default:
                self.syncs["tensor from host data"] += 1
            return super().__torch_dispatch__(func, types, args, kwargs)

    views = MultiCrop(32, 16, n_local_crops=2, device_augment=True)
    dm = PatchDataModule(stores=["unused"], views=views)
    stack = np.stack(tiles[3:7])
    rngs = [np.random.default_rng(i) for i in range(len(stack))]
    params = torch.from_numpy(views.draw_params(rngs, stack.shape[1:3]))

    def batch(with_params: bool) -> dict:
        made = {"tiles": torch.from_numpy(stack), "index": torch.arange(len(stack))}
        return {**made, "view_params": params} if with_params else made

    dm.on_after_batch_transfer(batch(True), 0)  # caches the device constants once
    shipped, bare = batch(True), batch(False)
    with Counter() as counter:
        out = dm.on_after_batch_transfer(shipped, 0)
    assert len(out["views"]) == 4 and dict(counter.syncs) == {}
    with Counter() as counter:
        dm.on_after_batch_transfer(bare, 0)
    assert counter.syncs["tensor from host data"] >= 1


def _sharpness(views: torch.Tensor) -> torch.Tensor:
    """Mean absolute horizontal gradient per view: blur lowers it."""
    x = views.float()
    return (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_dino_asymmetric_global_crops_blur_one_and_solarise_the_other(path, tiles):
    kwargs = dict(
        global_size=96, local_size=32, n_local_crops=1, crop_microns=None, brightness=0.0,
        contrast=0.0, gamma=0.0, gray_p=0.0, hed_strength=0.0, blur_sigma=(1.5, 2.0),
        global_blur_p=[1.0, 0.0], global_solarize_p=[0.0, 1.0],
    )  # fmt: skip
    tile, n = tiles[0], 16
    if path == "cpu":
        generator = MultiCrop(**kwargs)
        per_tile = [_views(generator, tile, seed) for seed in range(n)]
        first, second = (torch.stack([v[i] for v in per_tile]) for i in (0, 1))
    else:
        generator = MultiCrop(**kwargs, device_augment=True)
        generator.set_seed(0)
        out = generator.device_views(_batch([tile] * n))
        first, second = (generator.denormalize(v) for v in out[:2])
    # Solarised: every pixel >= 128 was inverted (the device path's float 127.6 rounds to 128).
    assert int(second.max()) <= 128
    assert int(first.max()) > 127
    plain = MultiCrop(**{**kwargs, "global_blur_p": [0.0, 0.0]})
    sharp = torch.stack([_views(plain, tile, seed)[0] for seed in range(n)])
    assert _sharpness(first).mean() < 0.7 * _sharpness(sharp).mean()


def test_asymmetric_probabilities_need_one_value_per_crop():
    with pytest.raises(ScratchpathError, match="global_blur_p: needs 2 values"):
        MultiCrop(global_blur_p=[1.0])


def test_device_augment_none_resolves_from_the_device():
    assert TwoViews().resolve_device_augment("cuda") is True
    assert TwoViews().resolve_device_augment("cpu") is False
    assert TwoViews(device_augment=False).resolve_device_augment("cuda") is False
    assert TwoViews(hue=0.1).resolve_device_augment("cuda") is False  # no device hue jitter


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


def test_cpu_only_augmentations_reject_an_explicit_device_path():
    with pytest.raises(ScratchpathError, match="device_augment"):
        TwoViews(saturation=0.5, device_augment=True)
    with pytest.raises(ScratchpathError, match="device_augment"):
        MultiCrop(stain="hestain", device_augment=True)


def test_on_device_rejects_the_wrong_number_of_view_batches():
    generator = MultiCrop(n_local_crops=2)
    with pytest.raises(ScratchpathError, match="expected 4 view batches"):
        generator.on_device([torch.zeros(1, 3, 8, 8, dtype=torch.uint8)] * 3)
