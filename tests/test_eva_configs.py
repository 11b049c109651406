"""The model card's eva configs run as they are, through eva's own CLI (``eva predict_fit``), on
a few real tiles: the card cannot drift from eva. Only the dataset class is swapped for one
without eva's full-size check (tests/eva_helpers.py)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embed_helpers import make_export
from scratchpath.eva_configs import PLACEHOLDER
from scratchpath.export import load_backbone

TESTS = Path(__file__).resolve().parent


def _card_config(export: Path, marker: str) -> str:
    card = (export / "README.md").read_text()
    blocks = [b.split("\n", 1)[1] for b in card.split("```")[1::2] if b.startswith("yaml")]
    (config,) = [b for b in blocks if marker in b]
    return config.replace(PLACEHOLDER, str(export))


def _eva(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    eva = Path(sys.executable).with_name("eva")
    pythonpath = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath, "N_RUNS": "1",
           "N_DATA_WORKERS": "0", "PREFETCH_FACTOR": "null",
           "PERSISTENT_WORKERS": "false", "ACCELERATOR": "cpu", "TQDM_REFRESH_RATE": "0",
           "OMP_NUM_THREADS": "1", **env}  # fmt: skip
    return subprocess.run([str(eva), *command], capture_output=True, text=True, timeout=900,
                          env=env, cwd=cwd)  # fmt: skip


@torch.no_grad()
def test_in_features_is_what_a_catavgmax_backbone_gives(tmp_path):
    # global_pool="catavgmax" pools avg and max side by side: 2 x timm's num_features
    arch = ("resnet10t", {"channels": [8, 8, 16, 32], "global_pool": "catavgmax"})
    export = make_export(tmp_path / "model", mpp=0.5, tile_size=64, arch=arch)
    width = load_backbone(export, verbose=False)(torch.rand(1, 3, 64, 64)).shape[1]
    card = (export / "README.md").read_text()
    assert width == 64 and f"`IN_FEATURES={width} " in card
    assert card.count(f"${{oc.env:IN_FEATURES, {width}}}") == 2  # CRC's head and ABMIL's


@pytest.mark.slow
def test_the_cards_crc_config_runs_in_eva_and_embeds_as_load_backbone(tmp_path, tiles_dir):
    """eva's patch-level CRC task (predict: embed; fit: linear head) on the 9 real
    NCT-CRC-HE-100K sample tiles, as train and as val split."""
    export = make_export(tmp_path / "model", mpp=0.5, tile_size=224, input_size=64)
    config = _card_config(export, "eva.vision.datasets.CRC")
    config = config.replace("eva.vision.datasets.CRC", "eva_helpers.FewCRC")
    (tmp_path / "crc.yaml").write_text(config)
    data = tmp_path / "crc"
    source = tiles_dir / "nct_crc_he_100k_samples"
    for split, prefix in (("NCT-CRC-HE-100K", ""), ("CRC-VAL-HE-7K", "VAL-")):
        for tile in sorted(source.glob("*/*.tif")):  # eva names embeddings by file name
            (data / split / tile.parent.name).mkdir(parents=True, exist_ok=True)
            (data / split / tile.parent.name / f"{prefix}{tile.name}").symlink_to(tile)
    env = {"DATA_ROOT": str(data), "EMBEDDINGS_ROOT": str(tmp_path / "embeddings"),
           "OUTPUT_ROOT": str(tmp_path / "logs"), "MAX_STEPS": "3", "BATCH_SIZE": "4",
           "PREDICT_BATCH_SIZE": "4"}  # fmt: skip
    done = _eva(["predict_fit", "--config", str(tmp_path / "crc.yaml")], env, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    root = tmp_path / "embeddings" / "resnet10t_scratchpath" / "crc"
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["split"] for r in rows) == ["train"] * 9 + ["val"] * 9
    from eva.vision.data.transforms.common import ResizeAndCrop

    model = load_backbone(export)
    pcfg = json.loads((export / "config.json").read_text())["pretrained_cfg"]
    transform = ResizeAndCrop(size=64, mean=pcfg["mean"], std=pcfg["std"])
    for row in rows[:3]:
        image = np.array(Image.open(data / "NCT-CRC-HE-100K" / row["origin"]).convert("RGB"))
        x = transform(torch.from_numpy(image).permute(2, 0, 1))[None]
        (stored,) = torch.load(root / row["embeddings"], weights_only=True)  # a list of one
        with torch.no_grad():
            torch.testing.assert_close(stored.reshape(1, -1), model(x), atol=1e-5, rtol=0)
    assert "val/MulticlassAccuracy" in done.stdout, done.stdout[-2000:]


@pytest.mark.slow
@torch.no_grad()
def test_the_cards_camelyon16_config_builds_in_eva_with_this_backbone_and_tiling(
    tmp_path, monkeypatch
):
    """eva's slide-level task, parsed and instantiated by eva's own CLI parser: the writer's
    backbone embeds as load_backbone, the head is eva's ABMIL on this embedding size, and the
    slides are cut at the export's µm/px and tile size."""
    import jsonargparse
    from eva.core import interface

    export = make_export(tmp_path / "model", mpp=0.5, tile_size=224, input_size=64)
    config = _card_config(export, "eva.vision.datasets.Camelyon16")
    path = tmp_path / "camelyon16_small.yaml"
    path.write_text(config.replace("eva.vision.datasets.Camelyon16", "eva_helpers.FewCamelyon16"))
    root = tmp_path / "camelyon16"  # eva's layout, empty: nothing is read when instantiating
    for folder in ("training/normal", "training/tumor", "testing/images"):
        (root / folder).mkdir(parents=True)
    (root / "testing" / "reference.csv").write_text("")
    for key, value in {"DATA_ROOT": root, "EMBEDDINGS_ROOT": tmp_path / "e",
                       "OUTPUT_ROOT": tmp_path / "logs"}.items():  # fmt: skip
        monkeypatch.setenv(key, str(value))
    monkeypatch.syspath_prepend(str(TESTS))
    args = ["predict_fit", "--config", str(path)]
    parser = jsonargparse.capture_parser(
        lambda: jsonargparse.CLI(
            interface.Interface, parser_mode="omegaconf", fail_untyped=False, args=args
        )
    )
    built = parser.instantiate_classes(parser.parse_args(args)).predict_fit
    (writer,) = [c for c in built.trainer.callbacks if type(c).__name__.endswith("Writer")]
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(writer._backbone.eval()(x), load_backbone(export)(x))
    head = built.model.head  # eva builds it anew for each of its N_RUNS
    assert head["class_path"] == "eva.vision.models.networks.ABMIL"
    assert int(head["init_args"]["input_size"]) == 96  # IN_FEATURES: this backbone's size
    predict = built.data.datasets.predict
    assert [d._split for d in predict] == ["train", "val", "test"]
    assert {(d._target_mpp, d._width, d._height) for d in predict} == {(0.5, 224, 224)}
