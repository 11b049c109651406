"""An export loads, strictly and offline, in every client a user already has: timm
(``local-dir:``, ``checkpoint_path=``), transformers (``TimmWrapperModel``, ``AutoModel``),
kaiko's eva (registry backbone, ``ModelFromFunction``, a linear-probe YAML through eva's own
parser and CLI) and ``scratchpath.load_backbone`` all give the same embeddings; every Python
snippet of the model card runs as written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from objective_helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from scratchpath.backbones import create_backbone
from scratchpath.export import export_checkpoint, load_backbone, load_config

MEAN, STD = [0.71, 0.52, 0.74], [0.16, 0.19, 0.13]
# the DINO smoke recipe's ViT (dynamic size: 48 px global, 24 px local crops) and the SimCLR
# smoke recipe's slim ResNet: one fixed-token model, one CNN with list-valued model_args
BACKBONES = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 48, "patch_size": 8, "depth": 4,
            "embed_dim": 96, "num_heads": 3, "dynamic_img_size": True}),
    "cnn": ("resnet10t", {"channels": [32, 64, 128, 256]}),
}  # fmt: skip
SIZE = 48
PLACEHOLDER = "path/to/this/folder"


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def export(request, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """An export of a scratchpath-format checkpoint and the (teacher) backbone it holds."""
    return _make_export(request.param, tmp_path_factory.mktemp(request.param))


def _make_export(name: str, tmp: Path) -> tuple[Path, torch.nn.Module]:
    arch, kwargs = BACKBONES[name]
    torch.manual_seed(0)
    student = create_backbone(arch, **kwargs)
    teacher = create_backbone(arch, **kwargs)
    state = {f"backbone.{k}": v for k, v in student.state_dict().items()}
    state |= {f"teacher_backbone.{k}": v for k, v in teacher.state_dict().items()}
    store = {"path": "runs/smoke_store", "fingerprint": "f1", "n_tiles": 240}
    data = {"mpp": 1.0, "tile_size": SIZE, "mean": MEAN, "std": STD, "stores": [store]}
    meta = {"version": "0.1.0", "objective": "dino", "backbone": arch, "backbone_kwargs": kwargs,
            "global_step": 50, "data": data, "config": "seed_everything: 0\n",
            "git_sha": "c0ffee"}  # fmt: skip
    torch.save({"state_dict": state, "global_step": 50, "scratchpath": meta}, tmp / "last.ckpt")
    return export_checkpoint(tmp / "last.ckpt", tmp / "export"), teacher.eval()


@pytest.fixture(scope="module")
def tile_files(tiles_dir: Path) -> list[Path]:
    return sorted((tiles_dir / "lc25000_lung_224" / "lung_scc").glob("*.jpeg"))[:3]


@pytest.fixture(scope="module")
def tiles(tile_files: list[Path]) -> torch.Tensor:
    """Real LC25000 tiles resized to the export's input size and normalised by its mean/std."""
    arrays = [np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE))) for f in tile_files]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _strict(model: torch.nn.Module, folder: Path) -> None:
    """The model holds every tensor of the file under its own key and nothing else (no head)."""
    exported = load_file(folder / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(exported), sorted(set(state) ^ set(exported))[:5]
    assert all(torch.equal(state[k], v) for k, v in exported.items())


def _same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_scratchpath_load_backbone(export, tiles):
    folder, teacher = export
    model = load_backbone(folder)
    _strict(model, folder)
    _same(model(tiles), teacher(tiles))


@torch.no_grad()
def test_timm_local_dir_loads_strictly_with_the_exports_preprocessing(export, tiles):
    folder, teacher = export
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    _strict(model, folder)
    _same(model(tiles), teacher(tiles))
    data = timm.data.resolve_data_config(model=model)
    assert tuple(data["input_size"]) == (3, SIZE, SIZE) and list(data["mean"]) == MEAN
    assert list(data["std"]) == STD and data["interpolation"] == "bilinear"
    assert data["crop_pct"] == 1.0


@torch.no_grad()
def test_timm_checkpoint_path_loads_strictly(export, tiles):
    folder, teacher = export
    cfg = load_config(folder)
    weights = str(folder / "model.safetensors")
    model = timm.create_model(
        cfg["architecture"], num_classes=0, checkpoint_path=weights, **cfg["model_args"]
    ).eval()
    _strict(model, folder)
    _same(model(tiles), teacher(tiles))


@torch.no_grad()
def test_transformers_timm_wrapper_and_auto_model_load_strictly(export, tiles):
    from transformers import AutoImageProcessor, AutoModel, TimmWrapperModel

    folder, teacher = export
    wrapper, info = TimmWrapperModel.from_pretrained(str(folder), output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == info["mismatched_keys"] == set()
    _strict(wrapper.timm_model, folder)
    _same(wrapper.eval()(tiles).pooler_output, teacher(tiles))
    auto = AutoModel.from_pretrained(str(folder)).eval()
    assert type(auto).__name__ == "TimmWrapperModel"
    _same(auto(tiles).pooler_output, teacher(tiles))
    processor = AutoImageProcessor.from_pretrained(str(folder))
    assert list(processor.data_config["mean"]) == MEAN
    assert tuple(processor.data_config["input_size"]) == (3, SIZE, SIZE)


@torch.no_grad()
def test_eva_timm_wrapper_loads_strictly(export, tiles):
    from eva.vision.models.wrappers import TimmModel

    folder, teacher = export
    cfg = load_config(folder)
    wrapper = TimmModel(
        cfg["architecture"],
        checkpoint_path=str(folder / "model.safetensors"),
        model_kwargs={"num_classes": 0, **cfg["model_args"]},
    )
    _strict(wrapper.model, folder)
    _same(wrapper.eval()(tiles), teacher(tiles))


@torch.no_grad()
def test_eva_registry_route_loads_a_stock_architecture_strictly(tmp_path, tiles):
    """eva's MODEL_NAME=timm/<arch> MODEL_EXTRA_KWARGS='{checkpoint_path: ...}' route: eva passes
    only checkpoint_path on, so it fits exports of an unmodified timm architecture."""
    from eva.vision.models import ModelFromRegistry

    torch.manual_seed(1)
    model = create_backbone("resnet10t").eval()
    meta = {"objective": "simclr", "backbone": "resnet10t", "backbone_kwargs": {}}
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "scratchpath": meta}, tmp_path / "a.ckpt")
    folder = export_checkpoint(tmp_path / "a.ckpt", tmp_path / "export")
    card = (folder / "README.md").read_text()
    extra = json.loads(card.split("MODEL_EXTRA_KWARGS='")[1].split("'")[0])
    extra = {k: v.replace(PLACEHOLDER, str(folder)) for k, v in extra.items()}
    wrapper = ModelFromRegistry("timm/resnet10t", model_extra_kwargs=extra)
    _strict(wrapper.model.model, folder)  # ModelFromRegistry -> TimmModel -> timm model
    _same(wrapper.eval()(tiles), model(tiles))


def _card_blocks(folder: Path, language: str) -> list[str]:
    """The card's code blocks in ``language``; for YAML only the ``backbone:`` snippets (the
    card's complete eva task configs are run by tests/test_eva_configs.py)."""
    card = (folder / "README.md").read_text()
    blocks = [b.split("\n", 1)[1] for b in card.split("```")[1::2] if b.startswith(language)]
    return [b for b in blocks if language != "yaml" or b.startswith("backbone:")]


def _linear_probe_yaml(backbone_block: str, tmp: Path, n_features: int) -> Path:
    """An eva linear-probe task (frozen backbone + linear head on 3 classes) whose backbone is
    the model card's YAML snippet."""
    backbone = "\n".join("    " + line for line in backbone_block.strip().splitlines())
    text = f"""---
trainer:
  class_path: eva.Trainer
  init_args:
    n_runs: 1
    default_root_dir: {tmp / "eva_logs"}
    max_steps: 10
model:
  class_path: eva.HeadModule
  init_args:
{backbone}
    head:
      class_path: torch.nn.Linear
      init_args:
        in_features: {n_features}
        out_features: 3
    criterion: torch.nn.CrossEntropyLoss
    optimizer:
      class_path: torch.optim.AdamW
      init_args:
        lr: 0.0003
data:
  class_path: eva.DataModule
  init_args:
    datasets:
      train:
        class_path: eva.vision.datasets.BACH
        init_args:
          root: {tmp / "bach"}
          split: train
          transforms:
            class_path: eva.vision.data.transforms.common.ResizeAndCrop
            init_args:
              size: {SIZE}
              mean: {MEAN}
              std: {STD}
    dataloaders:
      train:
        batch_size: 8
"""
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "linear_probe.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
@torch.no_grad()
def test_eva_linear_probe_yaml_from_the_card_instantiates_the_backbone(export, tiles, tmp_path):
    import jsonargparse
    from eva.core import interface

    folder, teacher = export
    n_features = load_config(folder)["num_features"]
    blocks = _card_blocks(folder, "yaml")
    assert len(blocks) == 2  # registry backbone, ModelFromFunction
    for i, block in enumerate(blocks):
        block = block.replace(PLACEHOLDER, str(folder)).removeprefix("backbone:\n")
        yaml_path = _linear_probe_yaml("backbone:\n" + block, tmp_path / str(i), n_features)
        args = ["fit", "--config", str(yaml_path)]
        # eva's CLI (eva.core.cli.cli) is exactly this parser; capture it instead of running
        parser = jsonargparse.capture_parser(
            lambda args=args: jsonargparse.CLI(
                interface.Interface, parser_mode="omegaconf", fail_untyped=False, args=args
            )
        )
        config = parser.parse_args(args)
        init = parser.instantiate(config)
        backbone = init.fit.model.backbone
        _same(backbone.eval()(tiles), teacher(tiles))
        assert type(init.fit.model.criterion).__name__ == "CrossEntropyLoss"


@pytest.mark.slow
def test_eva_cli_parses_the_linear_probe_yaml(tmp_path):
    """eva's own command line, beside scratchpath's pinned jsonargparse (4.52+ rejects
    ``criterion: torch.nn.CrossEntropyLoss``)."""
    folder, _ = _make_export("vit", tmp_path)
    block = _card_blocks(folder, "yaml")[0].replace(PLACEHOLDER, str(folder))
    yaml_path = _linear_probe_yaml(block, tmp_path, load_config(folder)["num_features"])
    eva = Path(sys.executable).with_name("eva")
    done = subprocess.run(
        [str(eva), "fit", "--config", str(yaml_path), "--print_config"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "torch.nn.CrossEntropyLoss" in done.stdout
    assert str(folder / "model.safetensors") in done.stdout


def _timm_module(model: torch.nn.Module) -> torch.nn.Module:
    """The timm model inside what a snippet built (transformers wraps it as timm_model)."""
    return getattr(model, "timm_model", model)


@torch.no_grad()
def test_every_python_snippet_of_the_model_card_runs_strictly(export, tile_files):
    folder, teacher = export
    blocks = _card_blocks(folder, "python")
    assert len(blocks) == 4
    for block in blocks:
        code = block.replace(PLACEHOLDER, str(folder)).replace(
            "path/to/tile.png", str(tile_files[0])
        )
        namespace: dict = {}
        torch.manual_seed(0)
        exec(compile(code, "model card snippet", "exec"), namespace)
        _strict(_timm_module(namespace["model"]), folder)
        _same(namespace["embeddings"], teacher(namespace["x"]))
        if "patches" in namespace:  # the scratchpath snippet: dense and feature-map outputs
            assert namespace["patches"].shape[:2] == (2, teacher.num_features)
            assert len(namespace["maps"]) == 4


def test_card_numbers_match_the_config(export):
    folder, _ = export
    cfg = load_config(folder)
    card = (folder / "README.md").read_text()
    assert json.dumps(cfg["pretrained_cfg"]["mean"]) in card.replace(", ", ", ")
    assert "1 µm/px" in card and f"IN_FEATURES={cfg['num_features']}" in card
