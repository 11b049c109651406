"""Paired statistics for comparing two models probed on the same splits of one labelled set.

Two intervals for the mean difference (model − reference) of a figure such as balanced
accuracy over ``R`` repeated train/test splits:

- **over splits**: Student's t on the per-split differences with Nadeau & Bengio's (2003)
  correction for resampled splits, variance ``(1/R + n_test/n_train) · s²`` instead of
  ``s²/R``. Repeated random splits share most of their tiles, so their differences are
  correlated; the uncorrected t-interval is then far too narrow (Bouckaert & Frank 2004), and
  no number of extra splits makes the corrected one narrower than ``s · √(n_test/n_train)``:
  the labelled set itself is the limit;
- **over cases**: a bootstrap of the test side by case (group): whole cases are drawn with
  replacement in every split, the probes' predictions are kept, and the mean difference over
  the splits is recomputed (percentile interval). It measures how much the figure would move
  with another sample of test cases, for the probes as trained.

A difference is called real only when both intervals exclude zero on the same side; otherwise
the report says it is within noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats


@dataclass(frozen=True)
class PairedDifference:
    """Model − reference over paired splits."""

    mean: float  # mean over splits of the per-split differences
    splits_low: float  # 95 % interval over splits (Nadeau-Bengio corrected t); nan for R = 1
    splits_high: float
    cases_low: float  # 95 % bootstrap interval over test cases
    cases_high: float
    wins: int  # splits where the model is above the reference
    ties: int
    n_splits: int

    @property
    def verdict(self) -> str:
        """``"above"``, ``"below"`` or ``"within noise"``."""
        lows, highs = (self.splits_low, self.cases_low), (self.splits_high, self.cases_high)
        if all(np.isfinite(lows)) and min(lows) > 0:
            return "above"
        if all(np.isfinite(highs)) and max(highs) < 0:
            return "below"
        return "within noise"

    def sentence(self, model: str, reference: str, figure: str = "balanced accuracy") -> str:
        """A plain sentence saying what the difference is and whether it is within noise."""
        intervals = (
            f"95 % interval {self.splits_low:+.3f} to {self.splits_high:+.3f} over splits, "
            f"{self.cases_low:+.3f} to {self.cases_high:+.3f} over cases"
        )
        wins = f"higher in {self.wins} of {self.n_splits} splits"
        if self.verdict == "within noise":
            return (
                f"{model} vs {reference}: {self.mean:+.3f} {figure} ({intervals}; {wins}): "
                "within noise, the data cannot tell these two apart."
            )
        return (
            f"{model} is {self.verdict} {reference} by {self.mean:+.3f} {figure} "
            f"({intervals}; {wins})."
        )


def corrected_t_interval(
    differences: Sequence[float], test_train_ratio: float, confidence: float = 0.95
) -> tuple[float, float]:
    """Nadeau-Bengio corrected resampled-t interval of the mean of per-split differences.

    Args:
        differences: one difference per split (``R`` of them).
        test_train_ratio: ``n_test / n_train`` of the splits.

    Returns ``(nan, nan)`` for fewer than two splits.
    """
    d = np.asarray(differences, dtype=np.float64)
    if len(d) < 2:
        return float("nan"), float("nan")
    se = np.sqrt((1.0 / len(d) + test_train_ratio) * d.var(ddof=1))
    t = scipy_stats.t.ppf(0.5 + confidence / 2, df=len(d) - 1)
    return float(d.mean() - t * se), float(d.mean() + t * se)


def balanced_accuracy_weighted(
    labels: np.ndarray, correct: np.ndarray, weights: np.ndarray, n_classes: int
) -> np.ndarray:
    """Balanced accuracy under tile weights: ``weights`` ``(B, N)`` (one row per bootstrap
    replicate), ``correct`` ``(N,)`` or ``(M, N)`` (M prediction sets, averaged) -> ``(B,)``.
    Classes with no weight in a replicate are left out of its mean, as sklearn does."""
    onehot = np.eye(n_classes, dtype=np.float64)[labels]  # (N, C)
    totals = weights @ onehot  # (B, C)
    correct = np.atleast_2d(correct).astype(np.float64)
    hits = np.einsum("bn,mn,nc->bc", weights, correct, onehot) / len(correct)  # (B, C)
    present = totals > 0
    recall = np.where(present, hits / np.maximum(totals, 1e-12), 0.0)
    return recall.sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def case_bootstrap_weights(groups: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, N)`` tile weights: each replicate draws the test cases (groups; an empty group
    is a case of its own tile) with replacement and weighs each tile by its case's count."""
    groups = np.asarray(groups).astype(str)
    keys = np.where(groups == "", np.char.add("\0tile", np.arange(len(groups)).astype(str)), groups)
    _, case_of = np.unique(keys, return_inverse=True)
    n_cases = int(case_of.max()) + 1
    counts = rng.multinomial(n_cases, np.full(n_cases, 1.0 / n_cases), size=n_boot)  # (B, G)
    return counts[:, case_of].astype(np.float64)


@dataclass(frozen=True)
class SplitPredictions:
    """What the paired comparison needs from one split: its test labels and cases, and each
    model's probe predictions (one row per random-init twin, else one row)."""

    labels: np.ndarray  # (N,) test labels
    groups: np.ndarray  # (N,) test case ids
    n_train: int
    predictions: dict[str, np.ndarray]  # model -> (M, N) predicted labels


def paired_difference(
    splits: Sequence[SplitPredictions],
    model: str,
    reference: str,
    n_classes: int,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> PairedDifference:
    """``model`` − ``reference`` balanced accuracy over paired splits, with both intervals."""
    per_split, boot = [], np.zeros(n_boot)
    ratios = []
    for i, split in enumerate(splits):
        ones = np.ones((1, len(split.labels)))
        a_correct = split.predictions[model] == split.labels
        b_correct = split.predictions[reference] == split.labels
        a = balanced_accuracy_weighted(split.labels, a_correct, ones, n_classes)[0]
        b = balanced_accuracy_weighted(split.labels, b_correct, ones, n_classes)[0]
        per_split.append(a - b)
        # the same case draws for both models: a paired bootstrap
        weights = case_bootstrap_weights(split.groups, n_boot, np.random.default_rng([seed, i]))
        boot += balanced_accuracy_weighted(split.labels, a_correct, weights, n_classes)
        boot -= balanced_accuracy_weighted(split.labels, b_correct, weights, n_classes)
        ratios.append(len(split.labels) / split.n_train)
    boot /= len(splits)
    d = np.asarray(per_split)
    low, high = corrected_t_interval(d, float(np.mean(ratios)))
    return PairedDifference(
        mean=float(d.mean()),
        splits_low=low,
        splits_high=high,
        cases_low=float(np.percentile(boot, 2.5)),
        cases_high=float(np.percentile(boot, 97.5)),
        wins=int((d > 1e-12).sum()),
        ties=int((np.abs(d) <= 1e-12).sum()),
        n_splits=len(d),
    )
