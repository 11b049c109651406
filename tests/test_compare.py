"""``scratchpath compare`` on real LC25000 lung tiles: every kind of model on the same splits,
each at its own preprocessing, paired against a reference."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from objective_helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from scratchpath.backbones import create_backbone
from scratchpath.cli import main
from scratchpath.errors import ScratchpathError
from scratchpath.export import export_checkpoint
from scratchpath.finetune import compare
from scratchpath.store import import_tiles

VIT, VIT_KW = "vit_tiny_patch16_224", {"img_size": 16, "patch_size": 8, "depth": 1}
CNN_KW = {"channels": [8, 8, 16, 16]}


@pytest.fixture(scope="module")
def lung(tmp_path_factory, tiles_dir: Path) -> Path:
    """60 LC25000 lung tiles (20 a class) at 32 px, grouped by original tile."""
    source = tiles_dir / "lc25000_lung_224"
    with open(source / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    tmp = tmp_path_factory.mktemp("lung")
    with open(tmp / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "case"])
        for c in ("lung_aca", "lung_n", "lung_scc"):
            for r in [r for r in rows if r["label"] == c][:20]:
                writer.writerow([r["path"], r["label"], r["lc25000clean_group_id"]])
    import_tiles(source, tmp / "store", labels_csv=tmp / "labels.csv", group_column="case",
                 tile_size=32)  # fmt: skip
    return tmp / "store"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny ViT export (16 px input, its own mean / std), as `scratchpath export` writes."""
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    backbone = create_backbone(VIT, **VIT_KW)
    data = {"mpp": 0.5, "tile_size": 32, "mean": [0.7, 0.5, 0.8], "std": [0.2, 0.2, 0.1]}
    meta = {"objective": "simclr", "backbone": VIT, "backbone_kwargs": VIT_KW, "version": 2,
            "data": data, "init": {"kind": "scratch"}}  # fmt: skip
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    torch.save({"state_dict": state, "scratchpath": meta}, tmp / "a.ckpt")
    return export_checkpoint(tmp / "a.ckpt", tmp / "model")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A timm-format classifier checkpoint of a small ResNet, as published weights come."""
    torch.manual_seed(1)
    model = timm.create_model("resnet10t", num_classes=3, **CNN_KW)
    path = tmp_path_factory.mktemp("w") / "resnet10t_given.safetensors"
    save_file(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def comparison(lung, export, weights_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    given = f"timm:resnet10t@{weights_file}?channels=[8,8,16,16]&input_size=24"
    result = compare(
        ["scratch=" + str(export), f"twin=random:{export}", f"given={given}", "histogram",
         "histogram:rgb"],
        [f"lung={lung}"], reference="scratch", out_dir=out, repeats=3, random_seeds=2,
        linear_epochs=10, k=5, n_boot=200,
    )  # fmt: skip
    return result, out


def test_each_model_is_embedded_at_its_own_size_and_normalisation(comparison):
    models = comparison[0].metrics["models"]
    assert models["scratch"]["input_size"] == 16 and models["scratch"]["mean"] == [0.7, 0.5, 0.8]
    assert models["twin"]["input_size"] == 16 and models["twin"]["random_init_seeds"] == [1, 2]
    assert models["given"]["input_size"] == 24
    assert models["given"]["mean"] == list(timm.create_model("resnet10t").pretrained_cfg["mean"])


def test_every_model_reports_how_its_weights_began(comparison, weights_file):
    models = comparison[0].metrics["models"]
    assert models["scratch"]["init"]["kind"] == "scratch"
    given = models["given"]["init"]
    assert given["kind"] == "file" and given["path"] == str(weights_file.resolve())
    assert given["dropped"] == ["fc.bias (classifier head)", "fc.weight (classifier head)"]
    assert "continued from" in comparison[0].init_lines()


def test_every_model_is_paired_with_the_reference_on_the_same_splits(comparison):
    results = comparison[0].metrics["results"]["lung"]
    for probe in ("linear", "knn"):
        by_model = results[probe]
        assert "difference" not in by_model["scratch"]
        for label in ("twin", "given", "histogram", "histogram:rgb"):
            r, ref = by_model[label], by_model["scratch"]
            d = r["difference"]
            per_split = [a - b for a, b in zip(r["splits"], ref["splits"], strict=True)]
            assert d["mean"] == pytest.approx(sum(per_split) / 3)
            assert d["wins"] == sum(x > 1e-12 for x in per_split) and d["n_splits"] == 3
            assert d["splits_low"] <= d["mean"] <= d["splits_high"]
            assert d["verdict"] in ("above", "below", "within noise")


def test_report_files_hold_one_table_csv_json_and_plot(comparison):
    _, out = comparison
    table = (out / "compare.md").read_text()
    assert "| model | init | lung |" in table
    assert all(f"| {m} |" in table for m in ("scratch", "twin", "given", "histogram"))
    rows = list(csv.DictReader(io.StringIO((out / "compare.csv").read_text())))
    assert len(rows) == 5 * 2 and {r["probe"] for r in rows} == {"linear", "knn"}
    assert json.loads((out / "compare.json").read_text())["reference"] == "scratch"
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_model_compared_with_itself_is_within_noise(lung, export):
    result = compare({"a": str(export), "b": str(export)}, [str(lung)], repeats=2,
                     linear_epochs=5, k=5, n_boot=100)  # fmt: skip
    d = result.metrics["results"][str(lung)]["linear"]["b"]["difference"]
    assert d["mean"] == 0 and d["ties"] == 2 and d["verdict"] == "within noise"
    assert any("within noise" in s for s in result.sentences("linear"))


def test_compare_command_prints_tables_sentences_and_inits(lung, export, tmp_path, capsys):
    code = main(["compare", "--data", str(lung), "--model", str(export), "histogram",
                 "--repeats", "2", "--linear-epochs", "5", "--k", "5", "--bootstrap", "100",
                 "--out", str(tmp_path / "cmp")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "linear probe" in out and "knn probe" in out and "(reference)" in out
    assert f"- {export}: from scratch (random initialisation)" in out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reference": "nope"}, "--reference: 'nope' is not one of"),
        ({"repeats": 1}, "at least 2 splits"),
        ({"models": ["histogram", "histogram"]}, "given twice"),
        ({"models": ["timm:resnet10t"]}, "expected timm:TIMM_NAME@FILE"),
        ({"models": ["no/such/export"]}, "not an export folder"),
    ],
)
def test_bad_compare_arguments_are_one_clear_error(lung, kwargs, message):
    arguments = {"models": ["histogram", "histogram:rgb"], "datasets": [str(lung)], **kwargs}
    with pytest.raises(ScratchpathError, match=message):
        compare(arguments.pop("models"), arguments.pop("datasets"), **arguments)
