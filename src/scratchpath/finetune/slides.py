"""The slide-level report of ``scratchpath eval --slides``: ABMIL against mean pooling on the
embeddings of labelled slides, over repeated patient-grouped, class-stratified splits.

``labels.csv`` has a ``slide`` column (a slide file, relative to the CSV, or a slide id: the
name of an embeddings file), ``label`` (class name) and optionally ``patient`` (default: the
slide). Slides whose ``<embeddings>/<slide id>.h5`` is missing are embedded first with the
export (:func:`scratchpath.embed.embed`: the same files a ``scratchpath embed`` run writes,
so a multi-GPU embedding made beforehand is reused, after its provenance is checked).

Per repeat ``r`` (seed ``seed + r``): a grouped, stratified test split
(:func:`~scratchpath.finetune.splits.grouped_split`), a second one of the rest for validation
(model selection), then both heads trained on the same bags with the same seed. Reported: the
test balanced accuracy and ROC AUC of each head, mean ± std over repeats, and ABMIL's attention
drawn on the thumbnails of the first repeat's test slides.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchpath import __version__
from scratchpath.embed import read_slide
from scratchpath.errors import ScratchpathError
from scratchpath.files import atomic_write
from scratchpath.finetune.heatmaps import plot_attention
from scratchpath.finetune.mil import HEADS, Bag, TrainConfig, predict, slide_metrics, train_head
from scratchpath.finetune.splits import grouped_split


def read_labels(path: str | Path) -> list[dict[str, str]]:
    """Rows of a slide-label CSV (``slide``, ``label``, optional ``patient``), checked."""
    path = Path(path)
    if not path.is_file():
        raise ScratchpathError(f"--slides: {path} not found")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ScratchpathError(f"{path}: no rows")
    for column in ("slide", "label"):
        if column not in rows[0]:
            raise ScratchpathError(f"{path}: no {column!r} column (columns: {list(rows[0])})")
    for i, row in enumerate(rows, start=2):
        if not row["slide"] or not row["label"]:
            raise ScratchpathError(f"{path}: line {i}: empty slide or label")
    return rows


def _slide_id(value: str) -> str:
    from scratchpath.slides import slide_stem

    return slide_stem(Path(value))


def resolve_bags(
    labels_csv: str | Path,
    embeddings: str | Path,
    *,
    model: str | Path | None = None,
    embed_kwargs: dict[str, Any] | None = None,
) -> tuple[list[Bag], list[str]]:
    """The labelled bags of ``labels_csv`` (class names sorted), embedding missing slides with
    ``model`` when the CSV names their files."""
    labels_csv, embeddings = Path(labels_csv), Path(embeddings)
    rows = read_labels(labels_csv)
    class_names = sorted({row["label"] for row in rows})
    if len(class_names) < 2:
        raise ScratchpathError(f"{labels_csv}: one class only ({class_names[0]}); need >= 2")
    ids = [_slide_id(row["slide"]) for row in rows]
    if len(set(ids)) != len(ids):
        raise ScratchpathError(f"{labels_csv}: a slide is listed twice")
    missing = [i for i, sid in enumerate(ids) if not (embeddings / f"{sid}.h5").is_file()]
    if missing:
        files = [labels_csv.parent / rows[i]["slide"] for i in missing]
        absent = [str(f) for f in files if not f.exists()]
        if model is None or absent:
            raise ScratchpathError(
                f"{labels_csv}: {len(missing)} slide(s) have no embeddings in {embeddings} "
                + (f"and no slide file (e.g. {absent[0]})" if absent else "(give --model)")
            )
        from scratchpath.embed import embed

        report = embed(files, model, embeddings, **(embed_kwargs or {}))
        if not report.ok:
            raise ScratchpathError(f"{labels_csv}: {report.failed[0]['reason']}")
    if model is not None:
        _check_encoder(model, [embeddings / f"{sid}.h5" for sid in ids])
    bags = []
    for row, sid in zip(rows, ids, strict=True):
        bags.append(
            Bag(
                sid,
                str(embeddings / f"{sid}.h5"),
                class_names.index(row["label"]),
                row.get("patient") or sid,
            )
        )
    return bags, class_names


def _check_encoder(model: str | Path, files: list[Path]) -> None:
    """Every embeddings file must come from ``model`` (its weights' sha256)."""
    from scratchpath.embed import read_provenance
    from scratchpath.export import WEIGHTS_FILE
    from scratchpath.files import file_sha256

    expected = file_sha256(Path(model) / WEIGHTS_FILE)
    for path in files:
        provenance = read_provenance(path) or {}
        if (provenance.get("encoder") or {}).get("export_sha256") != expected:
            raise ScratchpathError(
                f"{path}: embedded by another model than {model} (export sha256 differs); "
                "use another --embeddings folder"
            )


def run_slide_evaluation(
    labels_csv: str | Path,
    out: str | Path,
    *,
    embeddings: str | Path | None = None,
    model: str | Path | None = None,
    embed_kwargs: dict[str, Any] | None = None,
    test_fraction: float = 0.3,
    val_fraction: float = 0.3,
    repeats: int = 5,
    config: TrainConfig | None = None,
    seed: int = 0,
    heatmaps: int = 8,
    device: str = "cpu",
) -> dict[str, Any]:
    """ABMIL and mean pooling on labelled slides; writes ``out/slide_metrics.json`` and
    ``out/heatmaps/<slide>.png``; returns the metrics (see the module docstring)."""
    out = Path(out)
    embeddings = Path(embeddings) if embeddings is not None else out / "embeddings"
    if repeats < 1:
        raise ScratchpathError(f"--repeats: must be at least 1, got {repeats}")
    bags, class_names = resolve_bags(labels_csv, embeddings, model=model, embed_kwargs=embed_kwargs)
    config = config or TrainConfig()
    labels = np.array([b.label for b in bags])
    groups = np.array([b.group for b in bags])
    runs: dict[str, list[dict]] = {name: [] for name in HEADS}
    splits, first_heads = [], {}
    for r in range(repeats):
        split_seed = seed + r
        train_val, test = grouped_split(
            labels, groups, test_fraction=test_fraction, seed=split_seed
        )
        tr, va = grouped_split(
            labels[train_val], groups[train_val], test_fraction=val_fraction, seed=split_seed
        )
        train, val = train_val[tr], train_val[va]
        splits.append(
            {
                name: [bags[i].slide_id for i in side]
                for name, side in (("train", train), ("val", val), ("test", test))
            }
        )
        for name in HEADS:
            head, history = train_head(
                name,
                [bags[i] for i in train],
                [bags[i] for i in val],
                len(class_names),
                config=config,
                seed=split_seed,
                device=device,
            )
            probs = predict(head, [bags[i] for i in test], device)
            runs[name].append({**slide_metrics(labels[test], probs), **history})
            if r == 0:
                first_heads[name] = head
    metrics = {
        "scratchpath_version": __version__,
        "labels": str(labels_csv),
        "embeddings": str(embeddings),
        "class_names": class_names,
        "n_slides": len(bags),
        "n_patients": len(set(groups.tolist())),
        "split": {
            "test_fraction": test_fraction,
            "val_fraction": val_fraction,
            "repeats": repeats,
            "seeds": [seed + r for r in range(repeats)],
            "grouped_by": "patient",
        },
        "training": vars(config),
        "results": {name: _summary(runs[name]) for name in HEADS},
        "runs": runs,
        "splits": splits,
    }
    out.mkdir(parents=True, exist_ok=True)
    metrics["heatmaps"] = _heatmaps(
        first_heads["abmil"],
        [bags[i] for i in _test_order(splits[0]["test"], bags)],
        class_names,
        out / "heatmaps",
        heatmaps,
        device,
    )
    with atomic_write(out / "slide_metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1, default=float) + "\n")
    return metrics


def _test_order(test_ids: list[str], bags: list[Bag]) -> list[int]:
    """Test slides, positives (last class) first: the heatmaps worth looking at."""
    index = {b.slide_id: i for i, b in enumerate(bags)}
    return sorted((index[s] for s in test_ids), key=lambda i: (-bags[i].label, bags[i].slide_id))


def _summary(runs: list[dict]) -> dict[str, float]:
    out = {}
    for key in ("balanced_accuracy", "auc"):
        values = np.array([r[key] for r in runs], float)
        out[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        out[f"{key}_std"] = float(np.nanstd(values)) if np.isfinite(values).any() else 0.0
    return out


def _heatmaps(
    head, bags: list[Bag], class_names: list[str], folder: Path, limit: int, device: str
) -> list[str]:
    written = []
    for bag in bags[: max(limit, 0)]:
        slide = read_slide(bag.path)
        x = torch.from_numpy(np.array(slide.features, np.float32)).to(device)
        weights = head.attention(x).cpu().numpy()
        with torch.no_grad():
            prob = float(head(x[None]).softmax(1)[0, -1])
        title = f"{bag.slide_id}: {class_names[bag.label]}; ABMIL p({class_names[-1]}) = {prob:.2f}"
        folder.mkdir(parents=True, exist_ok=True)
        written.append(str(plot_attention(slide, weights, folder / f"{bag.slide_id}.png", title)))
    return written


def format_slide_table(metrics: dict[str, Any]) -> str:
    """The one table ``eval --slides`` prints: balanced accuracy and AUC per head."""
    split = metrics["split"]
    lines = [
        f"{metrics['n_slides']} slides of {metrics['n_patients']} patients, "
        f"{len(metrics['class_names'])} classes ({', '.join(metrics['class_names'])}); "
        f"{split['repeats']} patient-grouped splits, {split['test_fraction']:.0%} test",
        f"{'head':<12}{'balanced acc':>18}{'AUC':>18}",
    ]
    for name, r in metrics["results"].items():
        acc = f"{r['balanced_accuracy']:.3f} ± {r['balanced_accuracy_std']:.3f}"
        auc = f"{r['auc']:.3f} ± {r['auc_std']:.3f}"
        lines.append(f"{name:<12}{acc:>18}{auc:>18}")
    return "\n".join(lines)
