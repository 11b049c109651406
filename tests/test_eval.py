"""``scratchpath eval``: kNN + linear probe with baselines, on the real LC25000 lung tiles."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from objective_helpers import one_thread, one_torch_thread  # noqa: F401  (autouse fixture)
from scratchpath.backbones import create_backbone
from scratchpath.cli import main
from scratchpath.cli.eval import parse_kwargs
from scratchpath.errors import ScratchpathError
from scratchpath.export import export_checkpoint
from scratchpath.finetune import colour_histogram_features, run_evaluation
from scratchpath.store import PatchStore, import_tiles

LUNG = "lc25000_lung_224"
RANDOM_VIT = ["random:vit_tiny_patch16_224", "--model-kwargs", "img_size=48", "depth=2"]


@pytest.fixture(scope="module")
def lung_store(tmp_path_factory, tiles_dir: Path) -> Path:
    """All 740 LC25000 lung tiles, grouped by their LC25000-clean group id."""
    source = tiles_dir / LUNG
    out = tmp_path_factory.mktemp("lung") / "store"
    import_tiles(
        source, out, labels_csv=source / "labels.csv", group_column="lc25000clean_group_id"
    )
    return out


@pytest.fixture(scope="module")
def lung_report(lung_store, tmp_path_factory) -> tuple[Path, str]:
    """One grouped-split evaluation of a random-init tiny ViT, shared by the checks below."""
    out = tmp_path_factory.mktemp("eval") / "report"
    capture = tmp_path_factory.mktemp("stdout") / "out.txt"
    # module-scoped: the autouse one-thread fixture is not active yet
    with one_thread(), open(capture, "w") as f, contextlib.redirect_stdout(f):
        code = main(
            ["eval", "--model", *RANDOM_VIT, "--data", str(lung_store), "--split", "0.3",
             "--group-column", "group", "--linear-epochs", "50", "--out", str(out)]
        )  # fmt: skip
    assert code == 0
    return out, capture.read_text()


def test_eval_reports_model_and_both_baselines(lung_report):
    metrics = json.loads((lung_report[0] / "metrics.json").read_text())
    assert set(metrics["results"]) == {"model", "random_init", "colour_histogram"}
    for result in metrics["results"].values():
        for probe in ("knn", "linear"):
            r = result[probe]
            assert {"accuracy", "balanced_accuracy", "macro_f1"} <= set(r)
            assert all(0 <= r[k] <= 1 for k in ("accuracy", "balanced_accuracy", "macro_f1"))
            assert set(r["per_class"]) == {"lung_aca", "lung_n", "lung_scc"}
            assert {"precision", "recall", "f1", "support"} == set(r["per_class"]["lung_n"])
    assert metrics["architecture"] == "vit_tiny_patch16_224"
    assert metrics["model_kwargs"] == {"img_size": 48, "depth": 2}
    assert metrics["input_size"] == 48


def test_eval_split_covers_the_store_and_keeps_groups_apart(lung_report, lung_store):
    metrics = json.loads((lung_report[0] / "metrics.json").read_text())
    train, test = metrics["train"]["indices"], metrics["test"]["indices"]
    assert sorted(train + test) == list(range(740))
    groups = PatchStore(lung_store).tiles["group"]
    assert not set(groups[train]) & set(groups[test])
    assert 0.25 < len(test) / 740 < 0.35
    assert all(n > 60 for n in metrics["test"]["class_counts"].values())


def test_colour_histograms_exploit_lc25000s_colour_cast(lung_report):
    # SOURCE.md: benign tiles are pinker, tumour tiles bluer; chance is 1/3
    metrics = json.loads((lung_report[0] / "metrics.json").read_text())
    assert metrics["results"]["colour_histogram"]["linear"]["balanced_accuracy"] > 0.7


def test_eval_writes_confusion_matrix_and_embedding_plots(lung_report):
    for name in ("confusion_matrix.png", "embedding_pca.png"):
        with Image.open(lung_report[0] / name) as image:
            assert image.format == "PNG" and min(image.size) > 200


def test_eval_prints_a_table_of_all_feature_sets(lung_report):
    table = lung_report[1]
    for row in ("model", "random_init", "colour_histogram"):
        assert f"{row} " in table
    assert "bal.acc" in table


def test_colour_histograms_are_distributions_per_channel(lung_store):
    features = colour_histogram_features(PatchStore(lung_store), [0, 300, 700])
    assert features.shape == (3, 96)
    torch.testing.assert_close(features.view(3, 6, 16).sum(-1), torch.ones(3, 6))


@pytest.fixture(scope="module")
def small_stores(tmp_path_factory, tiles_dir: Path) -> tuple[Path, Path]:
    """Two disjoint 30-tile LC25000 stores at 32 px, as separate train and test stores."""
    source = tiles_dir / LUNG
    with open(source / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    tmp = tmp_path_factory.mktemp("small")
    for side, offset in (("train", 0), ("test", 10)):
        with open(tmp / f"{side}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label"])
            for c in ("lung_aca", "lung_n", "lung_scc"):
                for r in [r for r in rows if r["label"] == c][offset : offset + 10]:
                    writer.writerow([r["path"], r["label"]])
        import_tiles(source, tmp / side, labels_csv=tmp / f"{side}.csv", tile_size=32)
    return tmp / "train", tmp / "test"


def test_eval_of_an_export_uses_its_preprocessing_on_train_and_test_stores(small_stores, tmp_path):
    torch.manual_seed(0)
    kwargs = {"img_size": 16, "patch_size": 8, "depth": 1}
    backbone = create_backbone("vit_tiny_patch16_224", **kwargs)
    mean, std = [0.7, 0.5, 0.8], [0.2, 0.2, 0.1]
    torch.save(
        {
            "state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
            "scratchpath": {
                "objective": "simclr", "backbone": "vit_tiny_patch16_224",
                "backbone_kwargs": kwargs, "global_step": 1,
                "data": {"mpp": 1.7, "tile_size": 32, "mean": mean, "std": std, "stores": []},
            },
        },
        tmp_path / "a.ckpt",
    )  # fmt: skip
    export_checkpoint(tmp_path / "a.ckpt", tmp_path / "model")
    train, test = small_stores
    argv = [
        "eval",
        "--model",
        str(tmp_path / "model"),
        "--train",
        str(train),
        "--test",
        str(test),
        "--k",
        "5",
        "--linear-epochs",
        "20",
        "--out",
        str(tmp_path / "ev"),
    ]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["mean"] == mean and metrics["input_size"] == 16 and metrics["mpp"] == 1.7
    assert metrics["train"]["n_tiles"] == 30 and metrics["test"]["n_tiles"] == 30
    assert metrics["split"] is None and metrics["protocol"]["knn_k"] == 5


def test_eval_of_a_cnn_export_probes_at_the_size_it_trained_at(small_stores, tmp_path):
    # a CNN has no img_size: the size comes from the training views (data.input_size), not
    # from the 32 px tiles of the labelled store
    torch.manual_seed(0)
    kwargs = {"channels": [8, 8, 16, 16]}
    backbone = create_backbone("resnet10t", **kwargs)
    data = {"mpp": 0.5, "tile_size": 224, "input_size": 24, "mean": [0.5] * 3, "std": [0.2] * 3}
    torch.save(
        {
            "state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
            "scratchpath": {"objective": "simclr", "backbone": "resnet10t",
                            "backbone_kwargs": kwargs, "global_step": 1, "data": data},
        },
        tmp_path / "a.ckpt",
    )  # fmt: skip
    export_checkpoint(tmp_path / "a.ckpt", tmp_path / "model")
    train, test = small_stores
    metrics = run_evaluation(
        str(tmp_path / "model"), tmp_path / "ev", train=str(train), test=str(test), k=5,
        linear_epochs=5,
    )  # fmt: skip
    assert metrics["input_size"] == 24
    larger = run_evaluation(
        str(tmp_path / "model"), tmp_path / "ev64", train=str(train), test=str(test), k=5,
        linear_epochs=5, input_size=64,
    )  # fmt: skip
    assert larger["input_size"] == 64  # a CNN may be probed larger when asked


def test_eval_repeats_reports_the_mean_of_grouped_splits(lung_store, tmp_path, capsys):
    argv = ["eval", "--model", *RANDOM_VIT, "--data", str(lung_store), "--split", "0.4",
            "--repeats", "3", "--linear-epochs", "10", "--out", str(tmp_path / "ev")]  # fmt: skip
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["split"]["repeats"] == 3 and metrics["split"]["seeds"] == [0, 1, 2]
    for result in metrics["results"].values():
        for probe in ("knn", "linear"):
            r = result[probe]
            values = [split["balanced_accuracy"] for split in r["splits"]]
            assert len(values) == 3
            assert r["balanced_accuracy"] == pytest.approx(sum(values) / 3)
            assert r["std"]["balanced_accuracy"] == pytest.approx(float(np.std(values)))
    histogram = metrics["results"]["colour_histogram"]["linear"]["splits"]
    assert len({round(split["accuracy"], 6) for split in histogram}) > 1  # different splits
    assert "first of 3 grouped splits" in stdout and " ± " in stdout


def test_random_seeds_average_the_random_init_baseline_over_twins(lung_store, tmp_path, capsys):
    argv = ["eval", "--model", *RANDOM_VIT, "--data", str(lung_store), "--split", "0.4",
            "--repeats", "2", "--random-seeds", "3", "--linear-epochs", "10",
            "--out", str(tmp_path / "ev")]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["random_init_seeds"] == [1, 2, 3]
    twins = metrics["results"]["random_init"]["knn"]
    per_seed = [seed["balanced_accuracy"] for seed in twins["seeds"]]
    per_split = [split["balanced_accuracy"] for split in twins["splits"]]
    assert len(per_seed) == 3 and len(per_split) == 2
    assert len({round(v, 6) for v in per_seed}) > 1  # the twins differ
    assert twins["balanced_accuracy"] == pytest.approx(np.mean(per_seed))
    assert twins["balanced_accuracy"] == pytest.approx(np.mean(per_split))
    assert "seeds" not in metrics["results"]["model"]["knn"]  # the model is one init
    assert "mean ± std over 3 twins" in capsys.readouterr().out


def test_model_kwargs_are_parsed_as_yaml_values():
    parsed = parse_kwargs(["img_size=64", "dynamic_img_size=true", "drop_path_rate=0.1"])
    assert parsed == {"img_size": 64, "dynamic_img_size": True, "drop_path_rate": 0.1}
    with pytest.raises(ScratchpathError, match="KEY=VALUE"):
        parse_kwargs(["img_size"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train", "x", "--data", "y"], "either --data or --train"),
        (["--train", "x"], "both are needed"),
        (["--data", "{store}", "--group-column", "patient"], "no tile column 'patient'"),
        (["--data", "{store}", "--split", "0"], "test fraction"),
        (["--train", "{store}", "--test", "{store}", "--repeats", "2"], "needs one --data"),
        (["--data", "{store}", "--repeats", "0"], "must be >= 1"),
        (["--data", "{store}", "--random-seeds", "0"], "--random-seeds: must be >= 1"),
    ],
)
def test_eval_bad_arguments_exit_2_with_one_line(lung_store, tmp_path, capsys, extra, message):
    extra = [a.replace("{store}", str(lung_store)) for a in extra]
    code = main(["eval", "--model", *RANDOM_VIT, *extra, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_eval_refuses_an_unlabelled_store(tmp_path, tiles_dir):
    import_tiles(tiles_dir / "kather2016_texture_samples", tmp_path / "u", use_folder_labels=False)
    with pytest.raises(ScratchpathError, match="no class labels"):
        run_evaluation(RANDOM_VIT[0], tmp_path / "o", data=str(tmp_path / "u"))


def test_eval_of_an_unknown_random_model_is_a_clear_error(tmp_path, lung_store, capsys):
    code = main(["eval", "--model", "random:no_such_net", "--data", str(lung_store),
                 "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "unknown timm model" in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.json").exists()
