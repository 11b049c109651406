"""The evaluation report of ``scratchpath eval``: kNN and linear probe of a backbone on labelled
stores, next to two baselines measured in the same run, with plots.

Baselines: the same architecture randomly initialised (what the pretraining added) and
colour-histogram features (what colour alone gives: public tile sets often have a colour cast
per class, e.g. LC25000's pinker benign tiles, that any probe can exploit).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn

from scratchpath import __version__
from scratchpath.errors import ScratchpathError
from scratchpath.files import atomic_write
from scratchpath.finetune.models import random_model, resolve_model
from scratchpath.finetune.plots import plot_confusion_matrices, plot_embedding
from scratchpath.finetune.probes import (
    classification_metrics,
    extract_features,
    fit_linear_probe,
    knn_predict,
    rankme,
)
from scratchpath.finetune.splits import require_labels, split_store
from scratchpath.store import PatchStore


def colour_histogram_features(
    store: PatchStore,
    indices: Sequence[int] | np.ndarray,
    *,
    bins: int = 16,
    spaces: Sequence[str] = ("rgb", "hsv"),
) -> torch.Tensor:
    """Per-tile colour histograms: ``bins`` per channel of each colour space in ``spaces``
    (``"rgb"``, ``"hsv"``), each a distribution (sums to 1), concatenated to
    ``(N, 3 * len(spaces) * bins)`` float32."""
    if not spaces or set(spaces) - {"rgb", "hsv"}:
        raise ScratchpathError(f"histogram: colour spaces must be rgb and/or hsv, got {spaces}")
    indices = np.asarray(indices, dtype=np.int64)
    out = np.empty((len(indices), 3 * len(spaces), bins), np.float32)
    for start in range(0, len(indices), 256):
        for j, tile in enumerate(store.read(indices[start : start + 256]), start):
            images = {"rgb": tile}
            if "hsv" in spaces:  # all three channels on 0..255
                images["hsv"] = cv2.cvtColor(tile, cv2.COLOR_RGB2HSV_FULL)
            planes = [(images[space], channel) for space in spaces for channel in range(3)]
            for c, (image, channel) in enumerate(planes):
                out[j, c] = cv2.calcHist([image], [channel], None, [bins], [0, 256]).reshape(-1)
    out /= store.tile_size**2
    return torch.from_numpy(out.reshape(len(indices), -1))


def per_class_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each class."""
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=range(len(class_names)), zero_division=0
    )
    return {
        name: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
        for i, name in enumerate(class_names)
    }


def probe_features(
    train_features: torch.Tensor,
    train_labels: np.ndarray,
    test_features: torch.Tensor,
    test_labels: np.ndarray,
    class_names: Sequence[str],
    *,
    k: int = 20,
    linear_epochs: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """kNN and linear-probe results (summary + per-class + predictions) of one feature set."""
    knn = knn_predict(train_features, train_labels, test_features, k=k).numpy()
    probe = fit_linear_probe(train_features, train_labels, epochs=linear_epochs, seed=seed)
    with torch.no_grad():
        linear = probe(test_features).argmax(dim=1).numpy()
    result: dict[str, Any] = {"feature_dim": int(train_features.shape[1])}
    for name, pred in (("knn", knn), ("linear", linear)):
        result[name] = {
            **classification_metrics(test_labels, pred),
            "per_class": per_class_metrics(test_labels, pred, class_names),
            "predictions": pred.tolist(),
        }
    result["rankme"] = rankme(test_features)
    return result


def _store_info(store: PatchStore, indices: np.ndarray) -> dict[str, Any]:
    counts = np.bincount(store.labels[indices], minlength=len(store.class_names))
    return {
        "paths": store.paths,
        "fingerprint": store.fingerprint,
        "mpp": store.mpp,
        "tile_size": store.tile_size,
        "n_tiles": len(indices),
        "indices": indices.tolist(),  # tile rows used, so the split can be audited and reused
        "class_counts": dict(zip(store.class_names, counts.tolist(), strict=True)),
    }


def run_evaluation(
    model: str,
    out_dir: str | Path,
    *,
    train: str | None = None,
    test: str | None = None,
    data: str | None = None,
    test_fraction: float = 0.3,
    repeats: int = 1,
    group_column: str = "group",
    model_kwargs: dict[str, Any] | None = None,
    input_size: int | None = None,
    batch_size: int = 64,
    k: int = 20,
    linear_epochs: int = 100,
    seed: int = 0,
    random_seeds: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate ``model`` (export folder or ``random:TIMM_NAME``) by kNN and linear probe.

    Either ``train`` and ``test`` stores, or one ``data`` store split by ``group_column``
    (see :func:`~scratchpath.finetune.splits.grouped_split`). With ``repeats`` > 1 (``data``
    only) the store is split ``repeats`` times (seeds ``seed``, ``seed + 1``, ...) and each
    summary figure is the mean over the splits (``std`` and the per-split values beside it);
    per-class figures, predictions and plots are those of the first split. Tiles are embedded
    once and resized to the model's input size (the export's ``input_size``: what it trained
    at) when it differs from the store's tile size; ``input_size`` overrides it (the
    colour-histogram baseline always sees the stored tiles). The random-init baseline is
    ``random_seeds`` twins of the architecture (init seeds ``seed + 1``, ``seed + 2``, ...):
    with more than one, its figures are the mean (and ``std``) over every (twin, split) pair,
    since one random init can land several points above or below another. Writes ``metrics.json``,
    ``confusion_matrix.png`` and ``embedding_pca.png`` to ``out_dir`` and returns the metrics.
    """
    if (data is None) == (train is None or test is None):
        raise ScratchpathError("eval: give either --train and --test, or --data")
    if repeats < 1:
        raise ScratchpathError(f"--repeats: must be >= 1, got {repeats}")
    if repeats > 1 and data is None:
        raise ScratchpathError("--repeats: needs one --data store to split repeatedly")
    if random_seeds < 1:
        raise ScratchpathError(f"--random-seeds: must be >= 1, got {random_seeds}")
    backbone, info = resolve_model(model, model_kwargs, seed=seed)  # first: fail fast on typos
    if data is not None:
        train_store = test_store = PatchStore(data)
        splits = [
            split_store(train_store, test_fraction=test_fraction, group_column=group_column, seed=s)
            for s in range(seed, seed + repeats)
        ]
    else:
        train_store, test_store = PatchStore(train), PatchStore(test)
        splits = [(np.arange(len(train_store)), np.arange(len(test_store)))]
    labels_train = require_labels(train_store, "--train")
    labels_test = require_labels(test_store, "--test")
    if train_store.class_names != test_store.class_names:
        raise ScratchpathError(
            f"--test: classes {test_store.class_names} differ from {train_store.class_names}"
        )
    class_names = train_store.class_names

    size = input_size or info["input_size"]
    arch = info["architecture"]
    twin_seeds = list(range(seed + 1, seed + 1 + random_seeds))
    kw = {"mean": info["mean"], "std": info["std"], "batch_size": batch_size, "device": device}

    def embed(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        # every tile once, by store row: the splits index into these
        m = m.to(device)
        f_train = extract_features(m, train_store, input_size=size, **kw)
        if test_store is train_store:
            return f_train, f_train
        return f_train, extract_features(m, test_store, input_size=size, **kw)

    all_train, all_test = np.arange(len(train_store)), np.arange(len(test_store))
    histogram_train = colour_histogram_features(train_store, all_train)
    features = {
        "model": embed(backbone),
        **{
            f"random_init:{s}": embed(random_model(arch, info["model_kwargs"], seed=s))
            for s in twin_seeds
        },
        "colour_histogram": (
            histogram_train,
            histogram_train
            if test_store is train_store
            else colour_histogram_features(test_store, all_test),
        ),
    }
    per_split = [
        {
            name: probe_features(
                f_train[train_idx],
                labels_train[train_idx],
                f_test[test_idx],
                labels_test[test_idx],
                class_names,
                k=k,
                linear_epochs=linear_epochs,
                seed=seed,
            )
            for name, (f_train, f_test) in features.items()
        }
        for train_idx, test_idx in splits
    ]
    # One list of probe runs per reported feature set: the twins fold into "random_init".
    runs = {
        "model": [split["model"] for split in per_split],
        "random_init": [split[f"random_init:{s}"] for s in twin_seeds for split in per_split],
        "colour_histogram": [split["colour_histogram"] for split in per_split],
    }
    results = {
        name: r[0] if len(r) == 1 else _mean_over_runs(r, repeats) for name, r in runs.items()
    }
    train_idx, test_idx = splits[0]
    y_test = labels_test[test_idx]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "confusion_matrix": plot_confusion_matrices(
            {
                f"{p} probe": confusion_matrix(
                    y_test, per_split[0]["model"][p]["predictions"], labels=range(len(class_names))
                )
                for p in ("knn", "linear")
            },
            class_names,
            out_dir / "confusion_matrix.png",
            title=model,
        ).name,
        "embedding": plot_embedding(
            features["model"][1][test_idx],
            y_test,
            class_names,
            out_dir / "embedding_pca.png",
            title=model,
        ).name,
    }
    metrics = {
        "model": model,
        **{key: value for key, value in info.items() if key != "input_size"},
        "input_size": size,
        "class_names": class_names,
        "train": _store_info(train_store, train_idx),
        "test": _store_info(test_store, test_idx),
        "split": None
        if data is None
        else {
            "test_fraction": test_fraction,
            "group_column": group_column,
            "seed": seed,
            "repeats": repeats,
            "seeds": list(range(seed, seed + repeats)),
        },
        "protocol": {"knn_k": k, "knn_temperature": 0.07, "linear_epochs": linear_epochs},
        "random_init_seeds": twin_seeds,
        "seed": seed,
        "scratchpath_version": __version__,
        "results": results,
        "plots": plots,
    }
    _write_json(out_dir / "metrics.json", metrics)
    return metrics


_SUMMARY = ("accuracy", "balanced_accuracy", "macro_f1")


def _mean_over_runs(runs: list[dict[str, Any]], n_splits: int) -> dict[str, Any]:
    """Summary figures averaged over probe runs, ``std`` beside them; ``runs`` are the splits
    in order, repeated once per random-init twin. ``splits`` holds each split's figures (its
    mean over twins) and, with several twins, ``seeds`` each twin's (its mean over splits).
    Per-class figures and predictions are those of the first run (they index different test
    tiles per split)."""
    first = runs[0]
    n_twins = len(runs) // n_splits
    result: dict[str, Any] = dict(first)
    for probe in ("knn", "linear"):
        values = np.array([[run[probe][m] for m in _SUMMARY] for run in runs])  # (runs, 3)
        by_split = values.reshape(n_twins, n_splits, len(_SUMMARY))
        summary = {
            **first[probe],
            **dict(zip(_SUMMARY, values.mean(0).tolist(), strict=True)),
            "std": dict(zip(_SUMMARY, values.std(0).tolist(), strict=True)),
            "splits": [dict(zip(_SUMMARY, v, strict=True)) for v in by_split.mean(0).tolist()],
        }
        if n_twins > 1:
            summary["seeds"] = [
                dict(zip(_SUMMARY, v, strict=True)) for v in by_split.mean(1).tolist()
            ]
        result[probe] = summary
    result["rankme"] = float(np.mean([run["rankme"] for run in runs]))
    return result


def _write_json(path: Path, content: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2) + "\n")


def format_table(metrics: dict[str, Any]) -> str:
    """A short text table: one row per feature set and probe (mean ± std where the figures
    average several splits or random-init twins)."""
    results = metrics["results"].values()
    width = 14 if any("std" in r["knn"] for r in results) else 8
    lines = [f"{'features':<18} {'probe':<7} {'acc':>6} {'bal.acc':>{width}} {'macro-F1':>9}"]
    for name, result in metrics["results"].items():
        for probe in ("knn", "linear"):
            r = result[probe]
            balanced = f"{r['balanced_accuracy']:.3f}"
            if "std" in r:
                balanced += f" ± {r['std']['balanced_accuracy']:.3f}"
            lines.append(
                f"{name:<18} {probe:<7} {r['accuracy']:>6.3f} {balanced:>{width}} "
                f"{r['macro_f1']:>9.3f}"
            )
    return "\n".join(lines)
