"""Slide-level heads: ABMIL (as eva's) and mean pooling, on a synthetic cohort embedded by
``scratchpath embed``; ``eval --slides`` (grouped splits, metrics, heatmaps)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embed_helpers import make_export
from objective_helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from scratchpath.cli import eval as eval_cli
from scratchpath.embed import embed, read_slide
from scratchpath.errors import ScratchpathError
from scratchpath.finetune import ABMIL, MeanPool
from scratchpath.finetune.slides import run_slide_evaluation
from scratchpath.synthetic import write_cohort

# 16 slides of 512 x 512 µm (1 µm/px), 8 patients; positives hold a 60 µm-radius tumour focus:
# ~7 % of their ~110 tissue tiles of 32 µm. Embedded by a seeded random CNN.
COHORT = {"n_slides": 16, "size": (512, 512), "mpp": 1.0, "focus_um": 60.0, "seed": 0}
TILE = 32


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cohort")
    labels = write_cohort(root / "slides", **COHORT)
    export = make_export(root / "model", mpp=1.0, tile_size=TILE)
    report = embed(
        [root / "slides"], export, root / "embeddings", progress=False, log=lambda line: None
    )
    assert report.ok and len(report.slides) == COHORT["n_slides"]
    return labels, export, root / "embeddings"


@pytest.fixture(scope="module")
def evaluation(cohort, tmp_path_factory) -> dict:
    labels, export, embeddings = cohort
    from scratchpath.finetune.mil import TrainConfig

    out = tmp_path_factory.mktemp("eval")
    return run_slide_evaluation(
        labels,
        out,
        embeddings=embeddings,
        model=export,
        repeats=3,
        config=TrainConfig(epochs=40, patience=40),
        heatmaps=4,
    )


@pytest.mark.slow
def test_abmil_learns_the_tumour_focus_and_mean_pooling_does_not(evaluation) -> None:
    abmil, mean_pool = evaluation["results"]["abmil"], evaluation["results"]["mean_pool"]
    assert abmil["auc"] >= 0.9 and abmil["balanced_accuracy"] >= 0.75
    assert abmil["auc"] >= mean_pool["auc"] + 0.15  # the focus is diluted in the mean
    assert abmil["balanced_accuracy"] > mean_pool["balanced_accuracy"]
    assert len(evaluation["runs"]["abmil"]) == 3


@pytest.mark.slow
def test_splits_keep_each_patient_on_one_side(evaluation, cohort) -> None:
    with open(cohort[0], newline="") as f:
        patient = {row["slide"].split(".")[0]: row["patient"] for row in csv.DictReader(f)}
    for split in evaluation["splits"]:
        sides = [{patient[s] for s in split[name]} for name in ("train", "val", "test")]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
        assert sum(len(split[name]) for name in ("train", "val", "test")) == 16


@pytest.mark.slow
def test_attention_peaks_inside_the_tumour_focus(evaluation, cohort) -> None:
    """The heatmaps' ground truth: ABMIL's most attended tile of a positive test slide lies in
    the focus the cohort drew."""
    labels, _, embeddings = cohort
    with open(labels, newline="") as f:
        rows = {row["slide"].split(".")[0]: row for row in csv.DictReader(f)}
    positives = [s for s in evaluation["splits"][0]["test"] if rows[s]["label"] == "tumour"]
    assert positives and len(evaluation["heatmaps"]) == 4
    assert Path(evaluation["heatmaps"][0]).stem in positives  # positives are drawn first
    from scratchpath.finetune.mil import TrainConfig, train_head
    from scratchpath.finetune.slides import resolve_bags

    bags, _ = resolve_bags(labels, embeddings)
    by_id = {b.slide_id: b for b in bags}
    split = evaluation["splits"][0]
    head, _ = train_head(
        "abmil",
        [by_id[s] for s in split["train"]],
        [by_id[s] for s in split["val"]],
        2,
        config=TrainConfig(epochs=40, patience=40),
        seed=0,
    )
    for slide_id in positives:
        slide = read_slide(by_id[slide_id].path)
        weights = head.attention(torch.from_numpy(np.array(slide.features)))
        x, y = slide.coords[int(weights.argmax())] + TILE / 2
        fx, fy, radius = (float(rows[slide_id][k]) for k in ("focus_x", "focus_y", "focus_radius"))
        assert np.hypot(x - fx, y - fy) <= radius + TILE


@pytest.mark.slow
def test_eval_slides_cli_prints_one_table_and_writes_the_report(cohort, tmp_path, capsys):
    labels, export, embeddings = cohort
    parser = argparse.ArgumentParser(prog="scratchpath")
    eval_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "eval",
            "--slides",
            str(labels),
            "--model",
            str(export),
            "--embeddings",
            str(embeddings),
            "--repeats",
            "1",
            "--mil-epochs",
            "5",
            "--heatmaps",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert "abmil" in printed and "mean_pool" in printed and "AUC" in printed
    assert "model init: from scratch (random initialisation)" in printed
    metrics = json.loads((tmp_path / "slide_metrics.json").read_text())
    assert metrics["n_patients"] == 8 and metrics["class_names"] == ["normal", "tumour"]
    assert len(list((tmp_path / "heatmaps").glob("*.png"))) == 1


@pytest.mark.parametrize("model", ["random:resnet18", "timm:resnet18@weights.safetensors"])
def test_eval_slides_refuses_a_model_that_is_not_an_export(model, tmp_path, capsys) -> None:
    from scratchpath.cli import main

    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\na,x\nb,y\n")
    status = main(["eval", "--slides", str(labels), "--model", model, "--out", str(tmp_path)])
    error = capsys.readouterr().err.strip()
    assert status == 2
    assert error == "error: --slides: --model must be an export folder (it embeds slides)"


def test_missing_embeddings_without_slide_files_are_one_error_line(tmp_path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\na,x\nb,y\n")
    with pytest.raises(ScratchpathError, match=r"2 slide\(s\) have no embeddings") as err:
        run_slide_evaluation(labels, tmp_path / "out", embeddings=tmp_path / "none")
    assert "\n" not in str(err.value)


@torch.no_grad()
def test_abmil_computes_what_evas_abmil_computes_on_padded_bags() -> None:
    from eva.vision.models.networks import ABMIL as EVA_ABMIL

    torch.manual_seed(0)
    ours = ABMIL(96, 3).eval()
    theirs = EVA_ABMIL(input_size=96, output_size=3, projected_input_size=128).eval()
    # eva's module order: projector, attention a, b, c, classifier; ours: projector,
    # classifier, attention a, b, c
    linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    order = [linears[0], *linears[4:], *linears[1:4]]
    for a, b in zip(
        order, [m for m in theirs.modules() if isinstance(m, torch.nn.Linear)], strict=True
    ):
        b.weight.data.copy_(a.weight.data)
        b.bias.data.copy_(a.bias.data)
    bags = torch.randn(2, 7, 96)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    padded = bags.clone()
    padded[1, 4:] = float("-inf")  # eva's padding value
    torch.testing.assert_close(ours(bags, mask), theirs(padded))
    assert ours.attention(bags[1, :4]).sum() == pytest.approx(1.0)


@torch.no_grad()
def test_mean_pool_is_the_mean_of_the_real_tiles() -> None:
    torch.manual_seed(0)
    head = MeanPool(8, 2).eval()
    bag = torch.randn(1, 5, 8)
    padded = torch.cat([bag, torch.randn(1, 3, 8)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    torch.testing.assert_close(head(padded, mask), head(bag))
    expected = head.classifier(head.projector(bag).mean(dim=1))
    torch.testing.assert_close(head(bag), expected)


@pytest.mark.slow
def test_embeddings_of_another_model_are_refused(cohort, tmp_path) -> None:
    labels, _, embeddings = cohort
    other = make_export(tmp_path / "other", mpp=1.0, tile_size=TILE, seed=1)
    with pytest.raises(ScratchpathError, match="embedded by another model"):
        run_slide_evaluation(labels, tmp_path / "out", embeddings=embeddings, model=other)
