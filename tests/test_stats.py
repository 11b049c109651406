"""Paired statistics of ``scratchpath compare`` (finetune/stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import balanced_accuracy_score

from scratchpath.finetune.stats import (
    PairedDifference,
    SplitPredictions,
    balanced_accuracy_weighted,
    case_bootstrap_weights,
    corrected_t_interval,
    paired_difference,
)


def test_corrected_interval_is_students_t_widened_by_the_nadeau_bengio_factor():
    d = [0.02, 0.05, 0.01, 0.04, 0.03]
    plain = scipy_stats.t.interval(0.95, 4, loc=np.mean(d), scale=scipy_stats.sem(d))
    assert corrected_t_interval(d, 0.0) == pytest.approx(plain)
    low, high = corrected_t_interval(d, 0.4 / 0.6)
    widening = math.sqrt((1 / 5 + 0.4 / 0.6) / (1 / 5))
    assert (high - low) == pytest.approx((plain[1] - plain[0]) * widening)
    assert all(math.isnan(v) for v in corrected_t_interval([0.1], 0.5))


def test_weighted_balanced_accuracy_matches_sklearn_on_repeated_tiles():
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 4, 60), rng.integers(0, 4, 60)
    counts = rng.integers(0, 3, 60)
    got = balanced_accuracy_weighted(labels, predictions == labels, counts[None], 4)[0]
    expected = balanced_accuracy_score(np.repeat(labels, counts), np.repeat(predictions, counts))
    assert got == pytest.approx(expected)


def test_several_prediction_rows_give_the_mean_balanced_accuracy_of_the_rows():
    rng = np.random.default_rng(1)
    labels, rows = rng.integers(0, 3, 40), rng.integers(0, 3, (4, 40))
    got = balanced_accuracy_weighted(labels, rows == labels, np.ones((1, 40)), 3)[0]
    assert got == pytest.approx(np.mean([balanced_accuracy_score(labels, r) for r in rows]))


def test_case_bootstrap_draws_whole_cases():
    groups = np.array(["a", "a", "a", "b", "c", "c", ""])  # "" = a case of its own tile
    weights = case_bootstrap_weights(groups, 500, np.random.default_rng(0))
    assert np.all(weights[:, 0] == weights[:, 1]) and np.all(weights[:, 4] == weights[:, 5])
    # four cases are drawn per replicate: the case counts (one tile per case) sum to 4
    assert np.all(weights[:, [0, 3, 4, 6]].sum(axis=1) == 4)
    assert weights[:, 0].std() > 0  # not always the same draw


def _splits(model_correct: float, reference_correct: float, n: int = 60, repeats: int = 5):
    rng = np.random.default_rng(42)
    out = []
    for _ in range(repeats):
        labels = rng.integers(0, 3, n)
        groups = np.repeat(np.arange(n // 2).astype(str), 2)
        wrong = (labels + 1) % 3
        pred = {
            name: np.where(rng.random(n) < rate, labels, wrong)[None]
            for name, rate in (("model", model_correct), ("reference", reference_correct))
        }
        out.append(SplitPredictions(labels, groups, int(1.5 * n), pred))
    return out


def test_a_model_right_much_more_often_is_called_above():
    diff = paired_difference(_splits(0.95, 0.4), "model", "reference", 3, n_boot=500)
    assert diff.verdict == "above" and diff.wins == 5 and diff.splits_low > 0
    assert "is above reference by +0." in diff.sentence("model", "reference")


def test_identical_predictions_are_within_noise_with_zero_difference():
    splits = _splits(0.7, 0.7)
    same = [
        SplitPredictions(s.labels, s.groups, s.n_train, {"model": p, "reference": p})
        for s in splits
        for p in [s.predictions["reference"]]
    ]
    diff = paired_difference(same, "model", "reference", 3, n_boot=200)
    assert diff.mean == 0 and diff.ties == 5 and diff.wins == 0
    assert diff.verdict == "within noise"
    assert "within noise" in diff.sentence("model", "reference")


def test_both_intervals_must_exclude_zero_to_leave_within_noise():
    splits_only = PairedDifference(0.05, 0.01, 0.09, -0.01, 0.11, 5, 0, 5)
    assert splits_only.verdict == "within noise"
    assert PairedDifference(-0.05, -0.09, -0.01, -0.1, -0.02, 0, 0, 5).verdict == "below"
