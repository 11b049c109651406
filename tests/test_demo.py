"""`scratchpath demo --quick` runs the whole pipeline end to end (a fresh process, as a user)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "out"
    done = subprocess.run(
        [sys.executable, "-m", "scratchpath", "demo", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


@pytest.mark.slow
def test_demo_prints_one_line_per_step(demo):
    _, stdout = demo
    steps = [line for line in stdout.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] + "]" for line in steps] == [f"[{i}/9]" for i in range(1, 10)]
    assert "demo finished" in stdout
    # closing lines: the one command for real tiles and what it measured
    assert "on real H&E: make pretrain-cpu" in stdout
    assert "EBHI" in stdout.split("on real H&E:")[1]


@pytest.mark.slow
def test_demo_shows_live_pretraining_progress_under_its_step(demo):
    _, stdout = demo
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("[6/9] pretrain"))
    below = lines[start + 1 : start + 5]  # --quick: 4 steps, a line each
    assert [line.split("(")[0].strip() for line in below] == [f"step {i}/4" for i in range(1, 5)]
    assert all(" loss " in line and " left " in line for line in below)
    assert lines[start + 5].strip().startswith("final loss")
    assert lines[start + 6].startswith("[7/9]")


@pytest.mark.slow
def test_demo_exports_a_loadable_model(demo):
    import torch

    from scratchpath import load_backbone

    out, _ = demo
    model_dir = out / "model"
    assert (model_dir / "model.safetensors").is_file()
    config = json.loads((model_dir / "config.json").read_text())
    assert config  # written by the export, read back by load_backbone
    model = load_backbone(model_dir)
    features = model(torch.zeros(2, 3, 64, 64))
    assert features.shape[0] == 2 and features.ndim == 2


@pytest.mark.slow
def test_demo_metrics_compare_the_model_with_random_init(demo):
    out, stdout = demo
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert {"model", "random_init"} <= set(metrics["results"])
    assert sorted(metrics["class_names"]) == ["adipose", "glandular", "stroma", "tumour"]
    for name in ("model", "random_init"):
        for probe in ("knn", "linear"):
            assert 0.0 <= metrics["results"][name][probe]["accuracy"] <= 1.0
    assert "random_init" in stdout  # the table is printed


@pytest.mark.slow
def test_demo_writes_the_pictures(demo):
    out, _ = demo
    pictures = [
        out / "pictures" / "augmentations.png",
        out / "eval" / "confusion_matrix.png",
        out / "eval" / "embedding_pca.png",
        *sorted((out / "stores" / "pretrain" / "thumbnails").glob("*.png")),
    ]
    assert len(pictures) >= 5  # 3 plots + one thumbnail per synthetic slide
    for png in pictures:
        with Image.open(png) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 5, f"{png} is blank"


@pytest.mark.slow
def test_demo_ends_with_one_slide_level_command_table_and_heatmap(demo):
    out, stdout = demo
    lines = stdout.splitlines()
    step = next(i for i, line in enumerate(lines) if line.startswith("[9/9] slide level"))
    assert lines[step + 1].strip().startswith("$ scratchpath eval --slides ")  # the one command
    assert "ABMIL vs" in lines[step + 2] and "mean pooling" in lines[step + 2]
    table = stdout.split("slide level (synthetic cohort")[1]
    assert "abmil" in table and "mean_pool" in table and "AUC" in table
    metrics = json.loads((out / "eval_slides" / "slide_metrics.json").read_text())
    assert metrics["class_names"] == ["normal", "tumour"] and metrics["n_slides"] == 12
    heatmaps = list((out / "eval_slides" / "heatmaps").glob("*.png"))
    assert len(heatmaps) == 1 and str(heatmaps[0]) in stdout
    with Image.open(heatmaps[0]) as image:
        assert np.asarray(image.convert("RGB")).std() > 5
