"""Pathology augmentations on real H&E tiles: HED jitter, D4, Macenko, and each batched torch
kernel against the albumentations operation the CPU view path applies, at fixed parameters."""

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
    D4_ELEMENTS,
    HED_FROM_RGB,
    RGB_FROM_HED,
    HEDJitter,
    MacenkoNormalize,
    hed_jitter_numpy,
    kernels,
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


def test_d4_numbering_names_each_element_as_albumentations_does(deeptexture):
    """D4_ELEMENTS[k] is the A.D4 element that mirrors by bits 1, 2 of k, then transposes by
    bit 0 (how the device path folds k into its sampling grid); d4_torch agrees exactly."""
    tile = deeptexture[2]
    assert sorted(D4_ELEMENTS) == sorted(d4_group_elements)
    for k, name in enumerate(D4_ELEMENTS):
        by_bits = tile[:, ::-1] if k & 2 else tile
        by_bits = by_bits[::-1] if k & 4 else by_bits
        by_bits = by_bits.transpose(1, 0, 2) if k & 1 else by_bits
        assert np.array_equal(A.D4(p=1.0).apply(tile, group_element=name), by_bits), name
        assert np.array_equal(augment.d4_numpy(tile, k), by_bits), name
    batch = _to_batch(deeptexture)
    elements = torch.arange(len(deeptexture)) % 8
    out = _to_numpy(kernels.d4_torch(batch, elements))
    for i, tile in enumerate(deeptexture):
        assert np.array_equal(out[i], augment.d4_numpy(tile, int(elements[i])))


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


def _rounded(x: torch.Tensor) -> np.ndarray:
    return _to_numpy(x.round().clamp(0, 255).to(torch.uint8)).astype(int)


def test_hed_jitter_kernel_matches_numpy_at_fixed_params(lung):
    alpha = torch.tensor([[1.1, 0.9, 1.05], [0.8, 1.2, 1.0]])
    beta = torch.tensor([[0.05, -0.03, 0.02], [-0.1, 0.1, 0.0]])
    out = _rounded(kernels.hed_jitter_float(_to_batch(lung[:2]), alpha, beta))
    for i in range(2):
        expected = hed_jitter_numpy(lung[i], alpha[i].numpy(), beta[i].numpy(), (0.3, 0.6))
        assert np.abs(out[i] - expected).max() <= 1
        assert np.abs(out[i] - lung[i]).mean() > 2  # the parameters do change the tile


def test_gaussian_blur_kernel_matches_albumentations_at_fixed_sigma(deeptexture):
    from albumentations.augmentations.blur.functional import create_gaussian_kernel_1d

    sigmas = torch.tensor([0.0, 0.7, 1.9])
    out = _rounded(kernels.gaussian_blur_float(_to_batch(deeptexture[:3]), sigmas, 2.0))
    assert np.array_equal(out[0], deeptexture[0])  # sigma 0: untouched
    blur = A.GaussianBlur(blur_limit=0, p=1.0)
    for i in (1, 2):
        kernel = create_gaussian_kernel_1d(float(sigmas[i]), 0)
        expected = blur.apply(deeptexture[i], kernel=kernel)
        assert np.abs(out[i] - expected).max() <= 1
        assert np.abs(out[i] - deeptexture[i]).mean() > 1


def test_brightness_contrast_gamma_gray_kernels_match_albumentations(deeptexture):
    tile, batch = deeptexture[3], _to_batch([deeptexture[3]])
    checks = [
        (A.RandomBrightnessContrast(p=1.0).apply(tile, alpha=1.15, beta=-20.0),
         kernels.brightness_contrast_float(batch, torch.tensor([1.15]), torch.tensor([-20.0]))),
        (A.RandomGamma(p=1.0).apply(tile, gamma=0.85),
         kernels.gamma_float(batch, torch.tensor([0.85]))),
        (A.ToGray(p=1.0).apply(tile), kernels.to_gray_float(batch, torch.tensor([True]))),
    ]  # fmt: skip
    for expected, out in checks:
        assert np.abs(_rounded(out)[0] - expected).max() <= 1  # albumentations truncates
        assert np.abs(expected.astype(int) - tile).mean() > 2


@pytest.mark.parametrize(
    ("box", "size"),
    [((10, 30, 190, 200), 96), ((0, 0, 224, 224), 224), ((50, 20, 120, 110), 160)],
    ids=["downscale", "whole-tile", "upscale"],
)
def test_resized_crop_kernel_matches_albumentations_at_a_fixed_box(lung, box, size):
    """``A.RandomResizedCrop.apply`` at ``crop_coords``: crop, then cv2 INTER_LINEAR."""
    tile = lung[2]
    expected = A.RandomResizedCrop(size=(size, size), p=1.0).apply(tile, crop_coords=box)
    boxes = torch.tensor(box, dtype=torch.float32).view(1, 1, 4)
    out = _rounded(kernels.resized_crops(_to_batch([tile]), boxes, torch.zeros(1, 1), size)[0])
    difference = np.abs(out[0] - expected)
    # Upscaled crops: OpenCV repeats the crop's edge pixel where the kernel samples the tile
    # beyond it, in the outermost output row and column only.
    inner = difference[1:-1, 1:-1] if (box[2] - box[0]) < size else difference
    assert inner.max() <= 1 and difference.mean() < 0.6


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


def test_solarize_kernel_matches_albumentations(deeptexture):
    tile = deeptexture[5]
    expected = A.Solarize(threshold_range=(0.5, 0.5), p=1.0).apply(tile, threshold=0.5)
    out = _rounded(kernels.solarize_float(_to_batch([tile, tile]), torch.tensor([True, False])))
    assert np.array_equal(out[0], expected)
    assert np.array_equal(out[1], tile)
