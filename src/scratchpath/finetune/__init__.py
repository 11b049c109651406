"""Evaluating backbones on labelled patch stores: probe math, probe/fine-tune modules, reports.

Public API (importable by downstream packages):

- probe math on frozen features: :func:`extract_features`, :func:`knn_eval`,
  :func:`linear_probe_eval`, :func:`rankme` (also used by the online-evaluation callback);
- grouped splits: :func:`grouped_split`, :func:`split_store`;
- Lightning: :class:`LinearProbe`, :class:`FineTune` (layer-wise LR decay),
  :class:`LabelledTileDataModule` and :class:`LabelledTiles`;
- the ``scratchpath eval`` report: :func:`run_evaluation`, :func:`colour_histogram_features`;
- ``scratchpath compare``: :func:`compare` (models and baselines on the same splits, paired
  intervals against a reference) returning a :class:`Comparison`; :func:`resolve_model` (the
  model specs both commands take);
- slide level (``scratchpath eval --slides``), on ``scratchpath embed``'s files: the heads
  :class:`ABMIL` and :class:`MeanPool`, :func:`train_head`, :func:`run_slide_evaluation`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from scratchpath.finetune.probes import (
    classification_metrics,
    extract_features,
    fit_linear_probe,
    knn_eval,
    knn_predict,
    linear_probe_eval,
    rankme,
    tiles_to_tensor,
)
from scratchpath.finetune.splits import grouped_split, require_labels, split_store

# Lazy: Lightning (modules, data) and matplotlib (report) take seconds to import and the probe
# math or `scratchpath eval` do not need them.
_LAZY = {
    "ABMIL": "scratchpath.finetune.mil",
    "Bag": "scratchpath.finetune.mil",
    "MeanPool": "scratchpath.finetune.mil",
    "train_head": "scratchpath.finetune.mil",
    "run_slide_evaluation": "scratchpath.finetune.slides",
    "FineTune": "scratchpath.finetune.modules",
    "LinearProbe": "scratchpath.finetune.modules",
    "LabelledTileDataModule": "scratchpath.finetune.data",
    "LabelledTiles": "scratchpath.finetune.data",
    "colour_histogram_features": "scratchpath.finetune.report",
    "Comparison": "scratchpath.finetune.comparison",
    "compare": "scratchpath.finetune.comparison",
    "resolve_model": "scratchpath.finetune.models",
    "run_evaluation": "scratchpath.finetune.report",
}

__all__ = [
    "ABMIL",
    "Bag",
    "Comparison",
    "FineTune",
    "LabelledTileDataModule",
    "LabelledTiles",
    "LinearProbe",
    "MeanPool",
    "classification_metrics",
    "colour_histogram_features",
    "compare",
    "extract_features",
    "fit_linear_probe",
    "grouped_split",
    "knn_eval",
    "knn_predict",
    "linear_probe_eval",
    "rankme",
    "require_labels",
    "resolve_model",
    "run_evaluation",
    "run_slide_evaluation",
    "split_store",
    "tiles_to_tensor",
    "train_head",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scratchpath.finetune' has no attribute {name!r}")
