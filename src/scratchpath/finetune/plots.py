"""Evaluation plots: confusion matrices and a 2-D PCA embedding coloured by class.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch) and written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

from scratchpath.files import atomic_write


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_confusion_matrices(
    matrices: Mapping[str, np.ndarray], class_names: Sequence[str], path: Path, *, title: str = ""
) -> Path:
    """One panel per confusion matrix (rows: true class, columns: predicted), row-normalised
    colours with raw counts written in the cells."""
    n = len(matrices)
    size = 1.2 + 0.6 * len(class_names)
    fig = Figure(figsize=(size * n + 1, size + 0.8), layout="constrained")
    for i, (name, cm) in enumerate(matrices.items()):
        ax = fig.add_subplot(1, n, i + 1)
        rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for (r, c), count in np.ndenumerate(cm):
            ax.text(
                c,
                r,
                str(count),
                ha="center",
                va="center",
                color="white" if rates[r, c] > 0.5 else "black",
            )
        ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
        ax.set_yticks(range(len(class_names)), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        accuracy = np.trace(cm) / max(cm.sum(), 1)
        ax.set_title(f"{name} (acc {accuracy:.3f})")
    fig.suptitle(title)
    return _save(fig, path)


def plot_embedding(
    features: torch.Tensor,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    *,
    title: str = "",
) -> Path:
    """Scatter of the first two principal components of standardised features, by class."""
    x = features.double().numpy()
    x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-12)
    xy = PCA(n_components=2, random_state=0).fit_transform(x)
    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for c, name in enumerate(class_names):
        mask = labels == c
        ax.scatter(xy[mask, 0], xy[mask, 1], s=8, alpha=0.7, label=f"{name} ({mask.sum()})")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(markerscale=2, fontsize="small")
    ax.set_title(f"{title}: test embeddings (PCA)")
    return _save(fig, path)


def plot_comparison(metrics: Mapping, path: Path) -> Path:
    """``scratchpath compare``'s plot: one panel per (probe, dataset); per model its per-split
    balanced accuracies (dots; the same split has the same colour in every row, so pairs can
    be followed), their mean (bar) and its difference to the reference (text, ▲ / ▼ / ≈)."""
    results, models = metrics["results"], list(metrics["models"])
    datasets, probes = list(results), ["linear", "knn"]
    marks = {"above": "▲", "below": "▼", "within noise": "≈"}
    fig = Figure(
        figsize=(5.5 * len(datasets), 1.2 + 0.45 * len(models) * len(probes)),
        layout="constrained",
    )
    axes = fig.subplots(len(probes), len(datasets), squeeze=False)
    for row, probe in enumerate(probes):
        for col, dataset in enumerate(datasets):
            ax = axes[row][col]
            by_model = results[dataset][probe]
            ys = np.arange(len(models))[::-1]
            for y, label in zip(ys, models, strict=True):
                r = by_model[label]
                ax.barh(y, r["mean"], height=0.6, color="#cfd8e3")
                ax.scatter(r["splits"], [y] * len(r["splits"]), s=12,
                           c=np.arange(len(r["splits"])), cmap="tab10", vmin=0, vmax=9,
                           zorder=3)  # fmt: skip
                d = r.get("difference")
                text = "reference" if d is None else (
                    f"Δ {d['mean']:+.3f} [{d['splits_low']:+.3f}, {d['splits_high']:+.3f}] "
                    f"{marks[d['verdict']]}"
                )  # fmt: skip
                ax.text(1.0, y, f" {text}", va="center", fontsize="small",
                        transform=ax.get_yaxis_transform())  # fmt: skip
            ref = by_model[metrics["reference"]]["mean"]
            ax.axvline(ref, color="black", linestyle="--", linewidth=0.8)
            ax.set_yticks(ys, models)
            ax.set_xlabel(f"balanced accuracy ({probe} probe)")
            ax.set_title(dataset)
    fig.suptitle(f"paired splits; Δ vs {metrics['reference']} (95 % interval over splits)")
    return _save(fig, path)
