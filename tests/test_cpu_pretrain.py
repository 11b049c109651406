"""`recipes/cpu_pretrain.yaml` and `make pretrain-cpu`: the real-H&E CPU pipeline at 3 steps.

No accuracy is asserted: the figures of the full recipe are in docs/cpu_pretraining.md. What is
checked is that the recipe trains on the unlabelled pools, its checkpoint exports, and
``scratchpath eval`` probes the export on EBHI-Seg with the 5-split protocol's machinery at the
size the backbone trained at.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from objective_helpers import one_thread
from scratchpath.cli import main
from scratchpath.cli.fit import run_fit
from scratchpath.ingest import ingest
from scratchpath.store import import_tiles

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "cpu_pretrain.yaml"
POOLS = [
    "deeptexture_examples_unlabeled_256/unlabeled",
    "oral_oscc_224_unique",
    "consep_patches_256",
]
EVALUATION_SETS = ("ebhi", "lc25000")  # labelled: never pretrained on


def _recipe() -> dict:
    return yaml.safe_load(RECIPE.read_text())


@pytest.fixture(scope="module")
def pipeline(tiles_dir: Path, slides_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """The recipe at 3 steps on 24 tiles of each pool + one slide, exported, eval'd on EBHI."""
    root = tmp_path_factory.mktemp("cpu_pretrain")
    stores = []
    for pool in POOLS:
        subset = root / "subsets" / pool.split("/")[0]
        files = sorted(p for p in (tiles_dir / pool).rglob("*") if p.suffix in {".jpg", ".jpeg"})
        subset.mkdir(parents=True)
        for path in files[:: max(1, len(files) // 24)][:24]:
            shutil.copy(path, subset / path.name)
        store = root / "stores" / subset.name
        import_tiles(subset, store, use_folder_labels=False, tile_size=96)
        stores.append(store)
    slides = root / "stores" / "slides"
    ingest([slides_dir / "CMU-1-Small-Region.svs"], slides, mpp=0.5, tile_size=96, progress=False)
    stores.append(slides)
    ebhi = tiles_dir / "ebhi_seg_colorectal_224"
    ebhi_store = root / "stores" / "ebhi"
    import_tiles(
        ebhi, ebhi_store, labels_csv=ebhi / "labels.csv", group_column="case_id", tile_size=96
    )
    run = root / "run"
    with one_thread():
        assert run_fit(
            ["--config", str(RECIPE), "--data.stores", json.dumps([str(s) for s in stores]),
             "--data.batch_size", "16", "--trainer.max_steps", "3",
             "--trainer.default_root_dir", str(run)]
        ) == 0  # fmt: skip
        export = run / "export"
        assert main(["export", str(run / "checkpoints" / "last.ckpt"), "--out", str(export)]) == 0
        report = run / "eval_ebhi"
        assert main(
            ["eval", "--model", str(export), "--data", str(ebhi_store), "--split", "0.4",
             "--repeats", "2", "--linear-epochs", "5", "--out", str(report)]
        ) == 0  # fmt: skip
    return {"run": run, "export": export, "report": report}


@pytest.mark.slow
def test_recipe_export_is_probed_on_ebhi_at_its_training_size(pipeline: dict[str, Path]) -> None:
    config = json.loads((pipeline["export"] / "config.json").read_text())
    recipe = _recipe()
    views_size = recipe["data"]["views"]["init_args"]["output_size"]
    assert config["architecture"] == recipe["model"]["init_args"]["backbone"]
    assert config["pretrained_cfg"]["input_size"] == [3, views_size, views_size]
    assert config["scratchpath"]["global_step"] == 3
    metrics = json.loads((pipeline["report"] / "metrics.json").read_text())
    assert metrics["input_size"] == views_size  # not the 96 px of the EBHI store
    assert metrics["split"]["repeats"] == 2 and metrics["split"]["test_fraction"] == 0.4
    assert set(metrics["results"]) == {"model", "random_init", "colour_histogram"}
    assert len(metrics["class_names"]) == 6
    for result in metrics["results"].values():
        for probe in ("knn", "linear"):
            assert 0.0 <= result[probe]["balanced_accuracy"] <= 1.0
            assert len(result[probe]["splits"]) == 2


@pytest.mark.slow
def test_recipe_trains_channels_last_and_exports_the_same_weights_contiguous(
    pipeline: dict[str, Path],
) -> None:
    assert _recipe()["model"]["init_args"]["channels_last"] is True
    checkpoint = torch.load(
        pipeline["run"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    trained = {
        key.removeprefix("backbone."): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("backbone.")
    }
    nhwc = [k for k, v in trained.items() if v.dim() == 4 and not v.is_contiguous()]
    assert nhwc, "the recipe's checkpoint holds no channels-last weight"
    exported = load_file(pipeline["export"] / "model.safetensors")
    assert set(exported) == set(trained)
    for key in nhwc:
        assert exported[key].is_contiguous()
        assert torch.equal(exported[key], trained[key]), key


def test_recipe_never_pretrains_on_an_evaluation_set() -> None:
    stores = _recipe()["data"]["stores"]
    assert len(stores) == 4
    assert not any(name in store.lower() for store in stores for name in EVALUATION_SETS)


def test_recipe_header_states_the_measured_fit_time() -> None:
    header = RECIPE.read_text().split("seed_everything")[0]
    assert "Measured:" in header and "min" in header and "make pretrain-cpu" in header


def test_make_target_prepares_stores_fits_exports_and_evaluates() -> None:
    dry = subprocess.run(
        ["make", "-n", "pretrain-cpu", "BIN=bin"], cwd=REPO, capture_output=True, text=True
    )
    assert dry.returncode == 0, dry.stderr
    commands = dry.stdout
    for pool in POOLS:
        assert f"tiles/{pool}" in commands
    assert "ingest" in commands and "CMU-1-Small-Region.svs" in commands
    assert "fit --config recipes/cpu_pretrain.yaml" in commands
    assert "--out runs/cpu_pretrain/export" in commands
    assert "--model runs/cpu_pretrain/export" in commands and "--repeats 5" in commands
    assert "--random-seeds 6" in commands  # the random-init baseline is a mean of six inits
    assert "ebhi_seg_colorectal_224" in commands and "--group-column case_id" in commands
    assert "lc25000_lung_224/labels.csv" in commands  # LC25000 only as a labelled set


def test_compare_target_pairs_scratch_and_init_at_equal_steps() -> None:
    dry = subprocess.run(
        ["make", "-n", "compare-cpu", "BIN=bin", "INIT=w/given.safetensors"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    fits = [line for line in dry.stdout.splitlines() if "fit --config" in line]
    assert len(fits) == 2 and all("recipes/cpu_pretrain.yaml" in f for f in fits)
    assert "--model.init_args.init w/given.safetensors" in dry.stdout
    assert "--trainer.max_steps" not in dry.stdout  # equal steps: the recipe's, in both arms
    for part in (
        "scratch=runs/cpu_pretrain/export",
        "continued=runs/compare_cpu/continued",
        "random=random:runs/cpu_pretrain/export",
        "histogram",
        "--random-seeds 6",
    ):
        assert part in dry.stdout, part
