"""Pathology augmentations on real H&E tiles: HED jitter, D4, Macenko, and the torch twins."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from albumentations.core.type_definitions import d4_group_elements
from PIL import Image

from scratchpath import augment
from scratchpath.augment import (
    D4,
    HED_FROM_RGB,
    RGB_FROM_HED,
    HEDJitter,
    MacenkoNormalize,
    hed_jitter_numpy,
)
from scratchpath.errors import ScratchpathError


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def deeptexture(tiles_dir: Path) -> list[np.ndarray]:
    files = sorted((tiles_dir / "deeptexture_examples_unlabeled_256" / "unlabeled").glob("*.jpg"))
    return [_rgb(f) for f in files[:8]]


@pytest.fixture(scope="module")
def lung(tiles_dir: Path) -> list[np.ndarray]:
    files = sorted((tiles_dir / "lc25000_lung_224").glob("*/*.jpeg"))
    return [_rgb(f) for f in files[::90]]


@pytest.fixture(scope="module")
def no_tissue(slides_dir: Path) -> np.ndarray:
    return _rgb(slides_dir / "regions" / "histolab_no-tissue.png")


def _od(x: np.ndarray) -> np.ndarray:
    return -np.log((x.astype(np.float64) + 1) / 256)


def _to_batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def _to_numpy(batch: torch.Tensor) -> np.ndarray:
    return batch.permute(0, 2, 3, 1).numpy()


def test_hed_jitter_zero_strength_is_identity(deeptexture, lung):
    jitter = A.Compose([HEDJitter(strength=0.0)], seed=0)
    for tile in deeptexture + lung:
        out = jitter(image=tile)["image"]
        assert np.abs(out.astype(int) - tile).max() <= 1


def test_hed_affine_equals_unfused_colour_deconvolution(lung):
    alpha, beta = np.array([1.1, 0.85, 1.02]), np.array([0.04, -0.06, 0.01])
    od = _od(lung[0]).reshape(-1, 3)
    stains = od @ HED_FROM_RGB  # Ruifrok-Johnston deconvolution, then Tellez' jitter
    expected = (stains * alpha + beta) @ RGB_FROM_HED
    matrix, bias = augment.hed_affine(alpha, beta)
    np.testing.assert_allclose(od @ matrix + bias, expected, atol=1e-9)


def test_hed_jitter_changes_tissue_colour(deeptexture):
    out = A.Compose([HEDJitter(strength=0.2)], seed=1)(image=deeptexture[0])["image"]
    assert np.abs(out.astype(int) - deeptexture[0]).mean() > 2.0


def test_hed_jitter_leaves_background_untouched(no_tissue):
    for seed in range(4):
        out = A.Compose([HEDJitter(strength=0.3)], seed=seed)(image=no_tissue)["image"]
        changed = np.abs(out.astype(int) - no_tissue) > 1
        assert changed.mean() < 0.005  # only the few specks of dust on the glass move


def test_hed_jitter_same_seed_same_output_different_seed_different(deeptexture):
    def run(seed: int) -> np.ndarray:
        return A.Compose([HEDJitter(strength=0.1)], seed=seed)(image=deeptexture[1])["image"]

    assert np.array_equal(run(5), run(5))
    assert not np.array_equal(run(5), run(6))


def test_hed_jitter_keeps_uint8_shape_and_range_under_extreme_strength(lung):
    out = A.Compose([HEDJitter(strength=2.0)], seed=0)(image=lung[0])["image"]
    assert out.dtype == np.uint8 and out.shape == lung[0].shape
    assert out.min() == 0 or out.max() == 255  # saturated, not wrapped around


def test_hed_jitter_rejects_negative_strength():
    with pytest.raises(ScratchpathError, match="strength"):
        HEDJitter(strength=-0.1)


def test_d4_elements_are_exact_pixel_permutations(deeptexture):
    tile = deeptexture[2]
    outputs = []
    for name in d4_group_elements:
        out = D4(p=1.0).apply(tile, group_element=name)
        assert np.array_equal(
            np.sort(out.reshape(-1, 3), axis=0), np.sort(tile.reshape(-1, 3), axis=0)
        )
        outputs.append(out.tobytes())
    assert len(set(outputs)) == 8


def test_d4_matches_albumentations_d4_for_every_element(deeptexture):
    tile = deeptexture[4]
    for name in d4_group_elements:
        expected = np.ascontiguousarray(A.D4(p=1.0).apply(tile, group_element=name))
        assert np.array_equal(D4(p=1.0).apply(tile, group_element=name), expected)


def test_d4_torch_matches_albumentations_for_every_element(deeptexture):
    batch = _to_batch(deeptexture)
    elements = torch.arange(len(deeptexture)) % 8
    out = _to_numpy(augment.d4_torch(batch, elements))
    for i, tile in enumerate(deeptexture):
        expected = D4(p=1.0).apply(tile, group_element=d4_group_elements[int(elements[i])])
        assert np.array_equal(out[i], expected)


def test_macenko_moves_stain_statistics_toward_reference(deeptexture, lung):
    reference = deeptexture[0]
    normalize = MacenkoNormalize(reference)
    ref_od = _od(reference).reshape(-1, 3).mean(0)
    before = [np.linalg.norm(_od(t).reshape(-1, 3).mean(0) - ref_od) for t in lung[:6]]
    after = [
        np.linalg.norm(_od(normalize(image=t)["image"]).reshape(-1, 3).mean(0) - ref_od)
        for t in lung[:6]
    ]
    assert all(a < b for a, b in zip(after, before, strict=True))
    assert np.mean(after) < 0.7 * np.mean(before)


def test_macenko_reference_without_tissue_is_rejected(no_tissue):
    with pytest.raises(ScratchpathError, match="reference"):
        MacenkoNormalize(no_tissue)


def test_macenko_passes_a_tissue_free_image_unchanged(deeptexture, no_tissue):
    out = MacenkoNormalize(deeptexture[0])(image=no_tissue)["image"]
    assert np.array_equal(out, no_tissue)


def test_hed_jitter_torch_matches_numpy_for_fixed_params(lung):
    alpha = torch.tensor([[1.1, 0.9, 1.05], [0.8, 1.2, 1.0]], dtype=torch.float64)
    beta = torch.tensor([[0.05, -0.03, 0.02], [-0.1, 0.1, 0.0]], dtype=torch.float64)
    batch = _to_batch(lung[:2])
    out = _to_numpy(augment.hed_jitter_torch(batch, alpha, beta))
    for i in range(2):
        expected = hed_jitter_numpy(lung[i], alpha[i].numpy(), beta[i].numpy(), (0.3, 0.6))
        assert np.abs(out[i].astype(int) - expected).max() <= 1


def test_hed_jitter_torch_random_params_match_numpy_distribution(lung):
    """Per-channel mean OD shift over 200 draws: same mean and spread on both paths."""
    tile, n, strength = np.ascontiguousarray(lung[1][:96, :96]), 200, 0.2
    numpy_shifts = []
    jitter = A.Compose([HEDJitter(strength=strength)], seed=0)
    for _ in range(n):
        numpy_shifts.append((_od(jitter(image=tile)["image"]) - _od(tile)).mean((0, 1)))
    generator = torch.Generator().manual_seed(0)
    alpha, beta = augment.hed_params(n, strength, strength, generator, "cpu")
    out = _to_numpy(augment.hed_jitter_torch(_to_batch([tile] * n), alpha, beta))
    torch_shifts = (_od(out) - _od(tile)[None]).mean((1, 2))
    numpy_shifts = np.array(numpy_shifts)
    spread = numpy_shifts.std(0)
    assert np.all(np.abs(numpy_shifts.mean(0) - torch_shifts.mean(0)) < 0.25 * spread)
    np.testing.assert_allclose(torch_shifts.std(0), spread, rtol=0.2)


def test_gaussian_blur_torch_matches_albumentations_for_fixed_sigma(deeptexture):
    from albumentations.augmentations.blur import functional as fblur
    from albumentations.augmentations.pixel import functional as fpixel

    sigmas = torch.tensor([0.0, 0.7, 1.9])
    out = _to_numpy(augment.gaussian_blur_torch(_to_batch(deeptexture[:3]), sigmas))
    assert np.array_equal(out[0], deeptexture[0])  # sigma 0: untouched
    for i in (1, 2):
        kernel = fblur.create_gaussian_kernel_1d(float(sigmas[i]), 0)
        expected = fpixel.separable_convolve(deeptexture[i], kernel=kernel)
        assert np.abs(out[i].astype(int) - expected).max() <= 1


def test_brightness_contrast_gamma_gray_torch_match_albumentations(deeptexture):
    tile, batch = deeptexture[3], _to_batch([deeptexture[3]])
    bc = A.RandomBrightnessContrast(p=1.0).apply(tile, alpha=1.15, beta=-20.0)
    out = augment.brightness_contrast_torch(batch, torch.tensor([1.15]), torch.tensor([-20.0]))
    assert np.abs(_to_numpy(out)[0].astype(int) - bc).max() <= 1
    gamma = A.RandomGamma(p=1.0).apply(tile, gamma=0.85)
    out = augment.gamma_torch(batch, torch.tensor([0.85]))
    assert np.abs(_to_numpy(out)[0].astype(int) - gamma).max() <= 1
    gray = A.ToGray(p=1.0).apply(tile)
    out = augment.to_gray_torch(batch, torch.tensor([True]))
    assert np.abs(_to_numpy(out)[0].astype(int) - gray).max() <= 1


def test_micron_crop_scale_converts_side_to_area_fraction():
    assert augment.micron_crop_scale((56.0, 224.0), mpp=0.5, tile_px=224) == (0.25, 1.0)


def test_micron_crop_scale_without_mpp_is_rejected():
    with pytest.raises(ScratchpathError, match="mpp"):
        augment.micron_crop_scale((56.0, 112.0), mpp=None, tile_px=224)


def test_he_normalisation_constants_standardise_real_tiles(deeptexture, lung):
    pixels = np.concatenate([t.reshape(-1, 3) for t in deeptexture + lung]) / 255.0
    z = (pixels - np.array(augment.HE_MEAN)) / np.array(augment.HE_STD)
    assert np.all(np.abs(z.mean(0)) < 0.5)
    assert np.all((z.std(0) > 0.6) & (z.std(0) < 1.5))


def test_random_resized_boxes_match_albumentations_crop_distribution():
    """Area fraction and aspect ratio of the device crops against A.RandomResizedCrop's."""
    scale, n, tile = (0.05, 0.6), 2000, np.zeros((224, 224, 3), np.uint8)
    crop = A.RandomResizedCrop(size=(32, 32), scale=scale, p=1.0)
    pipeline = A.Compose([crop], seed=0)
    areas, ratios = [], []
    for _ in range(n):
        params = crop.get_params_dependent_on_data({"shape": tile.shape}, {"image": tile})
        x0, y0, x1, y1 = params["crop_coords"]
        areas.append((x1 - x0) * (y1 - y0) / 224**2)
        ratios.append((x1 - x0) / (y1 - y0))
    del pipeline
    boxes = augment.random_resized_boxes(n, scale, torch.Generator().manual_seed(0), "cpu")
    ours_area = (boxes[:, 2] * boxes[:, 3]).numpy()
    ours_ratio = (boxes[:, 2] / boxes[:, 3]).numpy()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= 1 + 1e-6).all()
    for ours, theirs in ((ours_area, np.array(areas)), (ours_ratio, np.array(ratios))):
        quantiles = np.linspace(0.1, 0.9, 9)
        np.testing.assert_allclose(
            np.quantile(ours, quantiles), np.quantile(theirs, quantiles), rtol=0.08
        )


def test_random_resized_boxes_fall_back_to_the_whole_tile():
    # Area 1 with aspect ratios away from 1 never fits: every box is the whole tile.
    boxes = augment.random_resized_boxes(
        50, (1.0, 1.0), torch.Generator().manual_seed(0), "cpu", ratio=(2.0, 3.0)
    )
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(50, 4))


def test_solarize_torch_matches_albumentations(deeptexture):
    tile = deeptexture[5]
    expected = A.Solarize(threshold_range=(0.5, 0.5), p=1.0).apply(tile, threshold=0.5)
    out = augment.solarize_torch(_to_batch([tile, tile]), torch.tensor([True, False]))
    assert np.array_equal(_to_numpy(out)[0], expected)
    assert np.array_equal(_to_numpy(out)[1], tile)
