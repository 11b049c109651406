"""``scratchpath compare``: several models and baselines probed on the same case-grouped splits of
one or more labelled stores, each against a reference with paired statistics.

Every model is embedded at its own input size and normalisation (an export's, timm's for a
``timm:`` model); the colour-histogram baselines read the stored tiles. On each dataset all
models share the same ``repeats`` grouped, class-stratified splits, so differences are paired:
for each model the mean difference to the reference comes with a 95 % interval over splits
(Nadeau-Bengio corrected t) and over test cases (bootstrap), the splits it wins, and a plain
sentence when the difference is within noise (:mod:`scratchpath.finetune.stats`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchpath import __version__
from scratchpath.errors import ScratchpathError
from scratchpath.files import atomic_write
from scratchpath.finetune.models import RANDOM_PREFIX, random_model, resolve_model
from scratchpath.finetune.plots import plot_comparison
from scratchpath.finetune.probes import extract_features, fit_linear_probe, knn_predict
from scratchpath.finetune.report import colour_histogram_features
from scratchpath.finetune.splits import require_labels, split_store
from scratchpath.finetune.stats import (
    SplitPredictions,
    balanced_accuracy_weighted,
    paired_difference,
)
from scratchpath.store import PatchStore
from scratchpath.weights import describe_init

HISTOGRAM = "histogram"
PROBES = ("linear", "knn")
_SPACES = {"histogram": ("rgb", "hsv"), "histogram:rgb": ("rgb",), "histogram:hsv": ("hsv",)}


def _labelled(items: Sequence[str] | Mapping[str, str], what: str) -> dict[str, str]:
    """``["LABEL=SPEC", "SPEC"]`` or ``{label: spec}`` -> ``{label: spec}`` (unique labels)."""
    if isinstance(items, Mapping):
        return dict(items)
    out: dict[str, str] = {}
    for item in items:
        label, sep, spec = item.partition("=")
        if not sep or "/" in label or label.startswith(("random:", "timm:")):
            label, spec = item, item  # no label given (a path or spec may hold '=' after '?')
        if label in out:
            raise ScratchpathError(f"--{what}: {label!r} given twice (label them LABEL=SPEC)")
        out[label] = spec
    if not out:
        raise ScratchpathError(f"--{what}: give at least one")
    return out


@dataclass
class _Model:
    label: str
    spec: str
    info: dict[str, Any]  # architecture, input size, mean/std, init (none for histograms)
    twin_seeds: list[int] | None = None

    def describe(self) -> dict[str, Any]:
        init = self.info.get("init")
        return {
            "spec": self.spec,
            **{k: v for k, v in self.info.items() if k != "init"},
            "init": init,
            "init_text": describe_init(init) if self.info.get("architecture") else "-",
            "random_init_seeds": self.twin_seeds,
        }


@dataclass
class Comparison:
    """The result of :func:`compare`: ``metrics`` (JSON-ready) and its renderings."""

    metrics: dict[str, Any]

    def table(self, probe: str = "linear") -> str:
        """Markdown: rows models, columns datasets; each cell the mean ± std over splits and,
        for non-reference models, Δ (95 % interval over splits) wins/splits and a mark:
        ▲ above, ▼ below, ≈ within noise (both intervals must agree to leave ≈)."""
        m = self.metrics
        datasets = list(m["datasets"])
        lines = [
            f"balanced accuracy, {probe} probe, mean ± std over {m['protocol']['repeats']} "
            f"case-grouped splits; Δ vs **{m['reference']}** (95 % interval over splits)",
            "",
            "| model | init | " + " | ".join(datasets) + " |",
            "|---|---|" + "---|" * len(datasets),
        ]
        marks = {"above": "▲", "below": "▼", "within noise": "≈"}
        for label, model in m["models"].items():
            cells = []
            for dataset in datasets:
                r = m["results"][dataset][probe][label]
                cell = f"{r['mean']:.3f} ± {r['std']:.3f}"
                d = r.get("difference")
                if d is not None:
                    cell += (
                        f" · Δ {d['mean']:+.3f} ({d['splits_low']:+.3f}…{d['splits_high']:+.3f})"
                        f" {d['wins']}/{d['n_splits']} {marks[d['verdict']]}"
                    )
                elif label == m["reference"]:
                    cell += " (reference)"
                cells.append(cell)
            lines.append(f"| {label} | {_short_init(model)} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def sentences(self, probe: str = "linear") -> list[str]:
        """One plain sentence per (dataset, model) against the reference."""
        out = []
        for dataset, by_probe in self.metrics["results"].items():
            for result in by_probe[probe].values():
                if result.get("sentence"):
                    out.append(f"{dataset}, {probe}: {result['sentence']}")
        return out

    def csv(self) -> str:
        """One row per (dataset, probe, model)."""
        buffer = io.StringIO()
        columns = ["dataset", "probe", "model", "mean", "std", "diff", "splits_low",
                   "splits_high", "cases_low", "cases_high", "wins", "n_splits", "verdict",
                   "init"]  # fmt: skip
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for dataset, by_probe in self.metrics["results"].items():
            for probe, by_model in by_probe.items():
                for label, r in by_model.items():
                    d = r.get("difference") or {}
                    writer.writerow(
                        [dataset, probe, label, f"{r['mean']:.4f}", f"{r['std']:.4f}"]
                        + [
                            _fmt(d.get(k))
                            for k in (
                                "mean",
                                "splits_low",
                                "splits_high",
                                "cases_low",
                                "cases_high",
                            )
                        ]
                        + [d.get("wins", ""), d.get("n_splits", ""), d.get("verdict", "")]
                        + [self.metrics["models"][label]["init_text"]]
                    )
        return buffer.getvalue()

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``compare.md``, ``compare.csv``, ``compare.json`` and ``compare.png``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {name: out_dir / f"compare.{name}" for name in ("md", "csv", "json", "png")}
        texts = {
            "md": "\n\n".join(
                [
                    self.table(p) + "\n\n" + "\n".join(f"- {s}" for s in self.sentences(p))
                    for p in PROBES
                ]
                + [self.init_lines()]
            )
            + "\n",
            "csv": self.csv(),
            "json": json.dumps(self.metrics, indent=2) + "\n",
        }
        for name, text in texts.items():
            with atomic_write(paths[name]) as tmp:
                tmp.write_text(text)
        plot_comparison(self.metrics, paths["png"])
        return paths

    def init_lines(self) -> str:
        """How each model's weights began (markdown list)."""
        return "initialisation:\n" + "\n".join(
            f"- {label}: {model['init_text']}" for label, model in self.metrics["models"].items()
        )


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4f}"


def _short_init(model: dict[str, Any]) -> str:
    init = model.get("init")
    if not model.get("architecture"):
        return "-"
    if not isinstance(init, dict):
        return "unrecorded"
    if init.get("kind") == "scratch":
        return "random" if model.get("random_init_seeds") else "from scratch"
    return f"{Path(str(init.get('path'))).name} ({str(init.get('sha256'))[:8]})"


def compare(
    models: Sequence[str] | Mapping[str, str],
    datasets: Sequence[str] | Mapping[str, str],
    *,
    reference: str | None = None,
    out_dir: str | Path | None = None,
    test_fraction: float = 0.4,
    repeats: int = 5,
    group_column: str = "group",
    random_seeds: int = 1,
    k: int = 20,
    linear_epochs: int = 100,
    seed: int = 0,
    n_boot: int = 2000,
    batch_size: int = 64,
    device: str = "cpu",
) -> Comparison:
    """Probe every model on every dataset on the same splits and compare each to ``reference``.

    Args:
        models: specs (``LABEL=SPEC`` or ``SPEC``; or a ``{label: spec}`` mapping): an export
            folder, ``random:DIR`` / ``random:TIMM_NAME`` (the mean of ``random_seeds`` twins,
            init seeds ``seed + 1`` ...), ``timm:TIMM_NAME@FILE`` (see
            :mod:`scratchpath.finetune.models`), or a baseline: ``histogram`` (RGB + HSV colour
            histograms of the stored tile, as ``scratchpath eval``), ``histogram:rgb``.
        datasets: labelled stores (``LABEL=STORE`` or ``STORE``), each split ``repeats`` times
            (seeds ``seed`` ...) by ``group_column`` with ``test_fraction`` of each class tested.
        reference: the label every other model is compared with (default: the first model).
        out_dir: when given, :meth:`Comparison.write` writes the table, CSV, JSON and plot there.
        n_boot: case-bootstrap replicates.

    Returns:
        The :class:`Comparison` (``.metrics``, ``.table()``, ``.sentences()``, ``.csv()``).
    """
    model_specs, data_specs = _labelled(models, "model"), _labelled(datasets, "data")
    reference = next(iter(model_specs)) if reference is None else reference
    if reference not in model_specs:
        raise ScratchpathError(f"--reference: {reference!r} is not one of {list(model_specs)}")
    if repeats < 2:
        raise ScratchpathError(f"--repeats: paired intervals need at least 2 splits, got {repeats}")
    if random_seeds < 1:
        raise ScratchpathError(f"--random-seeds: must be >= 1, got {random_seeds}")
    stores = {label: PatchStore(path) for label, path in data_specs.items()}
    splits = {label: _splits(store, test_fraction, group_column, seed, repeats)
              for label, store in stores.items()}  # fmt: skip
    entries: dict[str, _Model] = {}
    features: dict[str, dict[str, list[torch.Tensor]]] = {}  # model -> dataset -> per twin
    for label, spec in model_specs.items():
        entries[label], features[label] = _embed_model(
            label, spec, stores, seed=seed, random_seeds=random_seeds, batch_size=batch_size,
            device=device,
        )  # fmt: skip
    results = {
        dataset: _probe_dataset(
            stores[dataset],
            splits[dataset],
            group_column,
            {label: f[dataset] for label, f in features.items()},
            reference,
            k=k,
            linear_epochs=linear_epochs,
            seed=seed,
            n_boot=n_boot,
        )
        for dataset in stores
    }
    metrics = {
        "reference": reference,
        "protocol": {
            "test_fraction": test_fraction,
            "repeats": repeats,
            "split_seeds": list(range(seed, seed + repeats)),
            "group_column": group_column,
            "knn_k": k,
            "knn_temperature": 0.07,
            "linear_epochs": linear_epochs,
            "case_bootstrap": n_boot,
            "interval_over_splits": "Nadeau-Bengio corrected resampled t, 95 %",
            "interval_over_cases": "paired case bootstrap, percentile, 95 %",
        },
        "models": {label: entry.describe() for label, entry in entries.items()},
        "datasets": {
            label: {
                "path": data_specs[label],
                "fingerprint": store.fingerprint,
                "n_tiles": len(store),
                "class_names": store.class_names,
                "splits": [{"n_train": len(tr), "n_test": len(te)} for tr, te in splits[label]],
            }
            for label, store in stores.items()
        },
        "results": results,
        "scratchpath_version": __version__,
    }
    comparison = Comparison(metrics)
    if out_dir is not None:
        comparison.write(out_dir)
    return comparison


def _splits(
    store: PatchStore, test_fraction: float, group_column: str, seed: int, repeats: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        split_store(store, test_fraction=test_fraction, group_column=group_column, seed=s)
        for s in range(seed, seed + repeats)
    ]


def _embed_model(
    label: str,
    spec: str,
    stores: dict[str, PatchStore],
    *,
    seed: int,
    random_seeds: int,
    batch_size: int,
    device: str,
) -> tuple[_Model, dict[str, list[torch.Tensor]]]:
    """Features of every tile of every dataset for one model spec (one per random twin)."""
    if spec in _SPACES:
        entry = _Model(label, spec, {"baseline": f"colour histogram ({'+'.join(_SPACES[spec])})"})
        return entry, {
            name: [colour_histogram_features(s, np.arange(len(s)), spaces=_SPACES[spec])]
            for name, s in stores.items()
        }
    twin_seeds = list(range(seed + 1, seed + 1 + random_seeds))
    model, info = resolve_model(spec, seed=twin_seeds[0])
    twins = spec.startswith(RANDOM_PREFIX)
    entry = _Model(label, spec, info, twin_seeds if twins else None)
    print(f"{label}: {info['architecture']} at {info['input_size'] or 'stored'} px, "
          f"init {entry.describe()['init_text']}", flush=True)  # fmt: skip
    models = [model]
    if twins:
        models += [random_model(info["architecture"], info["model_kwargs"], seed=s)
                   for s in twin_seeds[1:]]  # fmt: skip
    kw = {"mean": info["mean"], "std": info["std"], "batch_size": batch_size, "device": device,
          "input_size": info["input_size"]}  # fmt: skip
    out = {name: [extract_features(m.to(device), s, **kw) for m in models]
           for name, s in stores.items()}  # fmt: skip
    return entry, out


def _probe_dataset(
    store: PatchStore,
    splits: list[tuple[np.ndarray, np.ndarray]],
    group_column: str,
    features: dict[str, list[torch.Tensor]],
    reference: str,
    *,
    k: int,
    linear_epochs: int,
    seed: int,
    n_boot: int,
) -> dict[str, dict[str, Any]]:
    labels = require_labels(store, "--data")
    groups = store.tile_column(group_column)
    n_classes = len(store.class_names)
    per_probe: dict[str, list[SplitPredictions]] = {p: [] for p in PROBES}
    for train, test in splits:
        predictions: dict[str, dict[str, np.ndarray]] = {p: {} for p in PROBES}
        for label, per_twin in features.items():
            rows = {p: [] for p in PROBES}
            for f in per_twin:
                rows["knn"].append(knn_predict(f[train], labels[train], f[test], k=k).numpy())
                probe = fit_linear_probe(f[train], labels[train], epochs=linear_epochs, seed=seed)
                with torch.no_grad():
                    rows["linear"].append(probe(f[test]).argmax(dim=1).numpy())
            for p in PROBES:
                predictions[p][label] = np.stack(rows[p])
        for p in PROBES:
            per_probe[p].append(
                SplitPredictions(labels[test], groups[test], len(train), predictions[p])
            )
    results: dict[str, dict[str, Any]] = {}
    for probe, split_predictions in per_probe.items():
        by_model = {}
        for label in features:
            per_split = [
                _balanced_accuracy(s.labels, s.predictions[label], n_classes)
                for s in split_predictions
            ]
            result: dict[str, Any] = {
                "mean": float(np.mean(per_split)),
                "std": float(np.std(per_split)),
                "splits": per_split,
            }
            if label != reference:
                diff = paired_difference(
                    split_predictions, label, reference, n_classes, n_boot=n_boot, seed=seed
                )
                result["difference"] = {**diff.__dict__, "verdict": diff.verdict}
                result["sentence"] = diff.sentence(label, reference)
            by_model[label] = result
        results[probe] = by_model
    return results


def _balanced_accuracy(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> float:
    """Balanced accuracy of a split, the mean over twins when ``predictions`` has several rows."""
    ones = np.ones((1, len(labels)))
    return float(balanced_accuracy_weighted(labels, predictions == labels, ones, n_classes)[0])
