"""The one parameter draw of both view paths (scratchpath.views.params), tested on its values:
each parameter's range, mean and probability against the settings, the crop boxes against
albumentations' own RandomResizedCrop, reproducibility per tile generator."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest

from scratchpath.views import MultiCrop, TwoViews
from scratchpath.views import params as P

N = 4000  # tiles: a probability p is estimated within ~4 standard errors by 0.03
TILE = (224, 224)


def _draw(generator, n: int = N, tile_hw=TILE, seed: int = 0) -> np.ndarray:
    rngs = [np.random.default_rng([seed, i]) for i in range(n)]
    return generator.draw_params(rngs, tile_hw)  # (V, n, N_PARAMS)


SETTINGS = dict(
    output_size=64, crop_scale=(0.3, 0.9), hed_strength=0.15, stain_p=0.7, brightness=0.25,
    contrast=0.15, gamma=0.2, color_p=0.6, blur_p=0.4, blur_sigma=(0.5, 1.5), gray_p=0.2,
    solarize_p=0.3,
)  # fmt: skip


@pytest.fixture(scope="module")
def drawn() -> np.ndarray:
    return _draw(TwoViews(**SETTINGS))


def _applied_fraction(values: np.ndarray, identity: float) -> float:
    return float((values != identity).mean())


def check_hed(rows: np.ndarray, strength: float, p: float) -> None:
    """HED alpha ~ U(1 ± strength), beta ~ U(± strength) per stain, with probability ``p``."""
    alpha, beta = rows[..., P.HED_ALPHA], rows[..., P.HED_BETA]
    applied = (alpha != 1).any(-1)
    assert abs(applied.mean() - p) < 0.03
    assert np.all((alpha == 1) == ~applied[..., None]) and np.all(
        (beta == 0) == ~applied[..., None]
    )
    a, b = alpha[applied], beta[applied]
    assert np.all(np.abs(a - 1) <= strength + 1e-6) and np.all(np.abs(b) <= strength + 1e-6)
    # uniform on a symmetric interval: mean 0, std = strength / sqrt(3), reaching both ends
    for x in (a - 1, b):
        np.testing.assert_allclose(x.mean(0), 0, atol=0.05 * strength)
        np.testing.assert_allclose(x.std(0), strength / np.sqrt(3), rtol=0.05)
        assert x.min() < -0.95 * strength and x.max() > 0.95 * strength


def check_blur(rows: np.ndarray, sigma: tuple[float, float], p: float) -> None:
    """sigma ~ U(sigma) with probability ``p``, else 0 (no blur)."""
    values = rows[..., P.BLUR_SIGMA]
    assert abs(_applied_fraction(values, 0.0) - p) < 0.03
    drawn = values[values > 0]
    low, high = sigma
    assert drawn.min() >= low - 1e-6 and drawn.max() <= high + 1e-6
    assert abs(drawn.mean() - (low + high) / 2) < 0.03 * (high - low)
    np.testing.assert_allclose(drawn.std(), (high - low) / np.sqrt(12), rtol=0.05)


def check_d4(rows: np.ndarray, enabled: bool = True) -> None:
    """The D4 element is uniform over the 8 (or always the identity when disabled)."""
    counts = np.bincount(rows[..., P.D4].astype(int).ravel(), minlength=8)
    if not enabled:
        assert counts[0] == counts.sum()
        return
    expected = counts.sum() / 8
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_hed_jitter_parameters_follow_strength_and_probability(drawn):
    check_hed(drawn, strength=0.15, p=0.7)


def test_blur_sigma_follows_its_range_and_probability(drawn):
    check_blur(drawn, sigma=(0.5, 1.5), p=0.4)


def test_d4_element_is_uniform_over_the_group(drawn):
    check_d4(drawn)
    check_d4(_draw(TwoViews(**SETTINGS, d4=False), n=200), enabled=False)


def test_brightness_contrast_and_gamma_follow_their_ranges(drawn):
    contrast, brightness = drawn[..., P.CONTRAST], drawn[..., P.BRIGHTNESS]
    applied = contrast != 1
    assert abs(applied.mean() - 0.6) < 0.03
    assert np.all(brightness[~applied] == 0)
    c, b = contrast[applied] - 1, brightness[applied] / 255
    for x, limit in ((c, 0.15), (b, 0.25)):
        assert np.abs(x).max() <= limit + 1e-6 and np.abs(x).max() > 0.95 * limit
        np.testing.assert_allclose(x.std(), limit / np.sqrt(3), rtol=0.05)
        assert abs(x.mean()) < 0.05 * limit
    gamma = drawn[..., P.GAMMA]
    assert abs(_applied_fraction(gamma, 1.0) - 0.6) < 0.03
    g = gamma[gamma != 1] - 1
    assert np.abs(g).max() <= 0.2 + 1e-6
    np.testing.assert_allclose(g.std(), 0.2 / np.sqrt(3), rtol=0.05)
    # contrast and gamma are drawn apart (both with color_p, independently)
    both = (applied & (gamma != 1)).mean()
    assert abs(both - 0.36) < 0.03


def test_grayscale_and_solarisation_follow_their_probabilities(drawn):
    for column, p in ((P.GRAY, 0.2), (P.SOLARIZE, 0.3)):
        values = drawn[..., column]
        assert set(np.unique(values)) == {0.0, 1.0}
        assert abs(values.mean() - p) < 0.03


def test_asymmetric_views_get_their_own_probabilities():
    generator = MultiCrop(global_size=64, local_size=32, n_local_crops=2, blur_p=0.5,
                          global_blur_p=[1.0, 0.1], global_solarize_p=[0.0, 0.2])  # fmt: skip
    rows = _draw(generator, n=2000)
    blur = (rows[..., P.BLUR_SIGMA] > 0).mean(1)
    solarize = rows[..., P.SOLARIZE].mean(1)
    np.testing.assert_allclose(blur, [1.0, 0.1, 0.5, 0.5], atol=0.035)
    np.testing.assert_allclose(solarize, [0.0, 0.2, 0.0, 0.0], atol=0.035)


def test_disabled_operations_draw_the_identity():
    generator = TwoViews(output_size=64, stain="none", brightness=0, contrast=0, gamma=0,
                         blur_p=0, gray_p=0, solarize_p=0)  # fmt: skip
    rows = _draw(generator, n=100)
    identity = np.zeros(P.N_PARAMS)
    identity[P.HED_ALPHA], identity[P.CONTRAST], identity[P.GAMMA] = 1, 1, 1
    others = [c for c in range(P.N_PARAMS) if c not in (0, 1, 2, 3, P.D4)]
    np.testing.assert_array_equal(
        rows[..., others], np.broadcast_to(identity[others], rows[..., others].shape)
    )


class _Replay:
    """Albumentations' ``py_random`` replaying our uniforms: RandomResizedCrop asks, per try,
    ``uniform`` for the area then the aspect ratio, and ``random`` twice (row, column start)
    once a try fits."""

    def __init__(self, u_area: np.ndarray, u_ratio: np.ndarray, u_start: np.ndarray) -> None:
        self.tries = np.stack([u_area, u_ratio], axis=1).ravel().tolist()
        self.starts = u_start.tolist()

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.tries.pop(0)

    def random(self) -> float:
        return self.starts.pop(0)


@pytest.mark.parametrize(
    ("scale", "tile_hw"),
    [((0.08, 1.0), (224, 224)), ((0.9, 1.0), (300, 160)), ((1.0, 1.0), (256, 64))],
    ids=["default", "rectangular-tile", "never-fits"],
)
def test_crop_boxes_are_albumentations_random_resized_crop_given_the_same_uniforms(scale, tile_hw):
    n = 500
    rng = np.random.default_rng(0)
    u_area, u_ratio, u_start = rng.random((n, 10)), rng.random((n, 10)), rng.random((n, 2))
    ours = P.crop_boxes(u_area, u_ratio, u_start, np.array(scale), tile_hw)
    crop = A.RandomResizedCrop(size=(32, 32), scale=scale, p=1.0)
    data = {"image": np.zeros((*tile_hw, 3), np.uint8)}
    theirs = []
    for i in range(n):
        crop.py_random = _Replay(u_area[i], u_ratio[i], u_start[i])
        params = crop.get_params_dependent_on_data({"shape": (*tile_hw, 3)}, data)
        theirs.append(params["crop_coords"])
    np.testing.assert_array_equal(ours, np.array(theirs, np.float64))


def test_crop_areas_and_ratios_follow_the_scale_and_ratio_ranges(drawn):
    boxes = drawn[..., P.BOX].reshape(-1, 4)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 224).all() and (boxes[:, 3] <= 224).all()
    assert np.array_equal(boxes, np.round(boxes))  # whole pixels, as albumentations crops
    area = w * h / 224**2
    assert area.min() > 0.29 and area.max() < 0.91  # (0.3, 0.9) up to the rounding of sides
    np.testing.assert_allclose(np.median(np.log(w / h)), 0, atol=0.02)
    assert np.log(w / h).max() < np.log(4 / 3) + 0.02


def test_micron_crops_set_the_global_crop_area():
    generator = TwoViews(output_size=64, crop_microns=(56.0, 56.0), mpp=0.5)  # 112 px of 224
    boxes = _draw(generator, n=200)[..., P.BOX]
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    np.testing.assert_allclose(area, 112**2, rtol=0.02)


def test_same_generator_state_same_parameters_and_independent_tiles():
    generator = MultiCrop(global_size=64, local_size=32, n_local_crops=3)
    a, b = _draw(generator, n=50, seed=1), _draw(generator, n=50, seed=1)
    np.testing.assert_array_equal(a, b)
    # a tile's parameters depend on its own generator only, not on the other tiles of a batch
    alone = generator.draw_params([np.random.default_rng([1, 7])], TILE)
    np.testing.assert_array_equal(alone[:, 0], a[:, 7])
    assert not np.array_equal(a, _draw(generator, n=50, seed=2))


def _halve_hed(rows: np.ndarray) -> None:
    rows[..., P.HED_ALPHA] = 1 + (rows[..., P.HED_ALPHA] - 1) / 2
    rows[..., P.HED_BETA] /= 2


DRAW_MUTATIONS = {  # broken draws, and the check that must catch each
    "hed-strength-x0.5": (_halve_hed, lambda r: check_hed(r, strength=0.15, p=0.7)),
    "blur-sigma-x4": (lambda r: r[..., P.BLUR_SIGMA].__imul__(4),
                      lambda r: check_blur(r, sigma=(0.5, 1.5), p=0.4)),
    "blur-never-applied": (lambda r: r[..., P.BLUR_SIGMA].fill(0),
                           lambda r: check_blur(r, sigma=(0.5, 1.5), p=0.4)),
    "d4-off": (lambda r: r[..., P.D4].fill(0), check_d4),
}  # fmt: skip


@pytest.mark.parametrize("mutation", sorted(DRAW_MUTATIONS))
def test_distribution_checks_fail_for_a_broken_draw(mutation, monkeypatch):
    """A test of the tests above: the draw both paths share, broken, fails its check."""
    from scratchpath.views import base

    break_rows, check = DRAW_MUTATIONS[mutation]

    def broken_draw(*args, **kwargs):
        rows = P.draw_params(*args, **kwargs)
        break_rows(rows)
        return rows

    monkeypatch.setattr(base, "draw_params", broken_draw)
    with pytest.raises(AssertionError):
        check(_draw(TwoViews(**SETTINGS)))
