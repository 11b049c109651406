"""``init`` on every objective, and the record of it: a backbone continued from given weights
can never be exported (or loaded, evaluated, compared) as one trained from scratch — not after
a resume without the ``init`` argument, not from its EMA teacher."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from objective_helpers import TINY_VIT, one_torch_thread, real_views  # noqa: F401
from scratchpath.backbones import create_backbone
from scratchpath.cli import main
from scratchpath.export import export_checkpoint, load_backbone, load_config
from scratchpath.objectives import DINO, OBJECTIVES, SimCLR
from scratchpath.store import import_tiles

ARCH = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """Given weights (as a published file would be): a timm state dict saved with torch."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("given") / "given_vit.pth"
    torch.save(create_backbone(ARCH, **TINY_VIT).state_dict(), path)
    return path


def _given(weights_file: Path) -> dict[str, torch.Tensor]:
    return torch.load(weights_file, weights_only=True)


def _holds(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    state = module.state_dict()
    return state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in state)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_starts_its_backbone_and_teacher_from_init(name, weights_file):
    module = OBJECTIVES[name](backbone=ARCH, backbone_kwargs=TINY_VIT, init=str(weights_file))
    given = _given(weights_file)
    assert _holds(module.backbone, given)
    if hasattr(module, "teacher_backbone"):
        assert _holds(module.teacher_backbone, given)  # the EMA teacher starts as the init
    assert module.init_record["kind"] == "file" and module.init_record["loaded"] == len(given)


@pytest.fixture(scope="module")
def batch(tiles_dir: Path) -> dict:
    """Two 32 px views of 4 real H&E tiles: the one batch every fit below repeats."""
    views = real_views(tiles_dir, n_images=4, n_views=2, size=32, seed=0)
    return {"views": views, "index": torch.arange(4)}


def _fit(
    batch: dict, module: L.LightningModule, root: Path, steps: int, ckpt_path: Path | None = None
):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True)],
    )
    trainer.fit(module, DataLoader([batch] * steps, batch_size=None), ckpt_path=ckpt_path)
    return root / "last.ckpt"


def test_a_continued_model_cannot_be_exported_as_from_scratch(batch, weights_file, tmp_path):
    first = _fit(batch, SimCLR(backbone=ARCH, backbone_kwargs=TINY_VIT, init=str(weights_file),
                        warmup_epochs=0), tmp_path / "run", steps=1)  # fmt: skip
    # resumed with a recipe that no longer names the init: the checkpoint's record stays
    resumed = _fit(batch, SimCLR(backbone=ARCH, backbone_kwargs=TINY_VIT, warmup_epochs=0),
                   tmp_path / "run", steps=2, ckpt_path=first)  # fmt: skip
    export_checkpoint(resumed, tmp_path / "export")
    config = load_config(tmp_path / "export")
    init = config["scratchpath"]["init"]
    assert config["scratchpath"]["global_step"] == 2
    assert init["kind"] == "file" and init["path"] == str(weights_file.resolve())
    assert init["sha256"] == __import__("hashlib").sha256(weights_file.read_bytes()).hexdigest()
    description = config["pretrained_cfg"]["description"]
    assert "pretrained from scratch" not in description and "continued from" in description
    card = (tmp_path / "export" / "README.md").read_text()
    assert "pretrained from scratch" not in card and "NOT from scratch" in card


def test_resuming_a_scratch_run_with_an_init_argument_keeps_from_scratch(
    batch, weights_file, tmp_path
):
    first = _fit(batch, SimCLR(backbone=ARCH, backbone_kwargs=TINY_VIT, warmup_epochs=0),
                 tmp_path / "run", steps=1)  # fmt: skip
    module = SimCLR(backbone=ARCH, backbone_kwargs=TINY_VIT, init=str(weights_file),
                    warmup_epochs=0)  # fmt: skip
    resumed = _fit(batch, module, tmp_path / "run", steps=2, ckpt_path=first)
    assert not _holds(module.backbone, _given(weights_file))  # the checkpoint's weights won
    export_checkpoint(resumed, tmp_path / "export")
    assert load_config(tmp_path / "export")["scratchpath"]["init"]["kind"] == "scratch"


def test_the_ema_teacher_export_of_a_continued_dino_run_says_continued(
    batch, weights_file, tmp_path
):
    module = DINO(backbone=ARCH, backbone_kwargs=TINY_VIT, init=str(weights_file), out_dim=64,
                  hidden_dim=32, bottleneck_dim=16, warmup_epochs=0)  # fmt: skip
    last = _fit(batch, module, tmp_path / "run", steps=1)
    export_checkpoint(last, tmp_path / "teacher", which="teacher")
    config = load_config(tmp_path / "teacher")
    assert config["scratchpath"]["weights"] == "teacher"
    assert config["scratchpath"]["init"]["kind"] == "file"


def test_load_backbone_prints_how_the_weights_began(batch, weights_file, tmp_path, capsys):
    first = _fit(batch, SimCLR(backbone=ARCH, backbone_kwargs=TINY_VIT, init=str(weights_file),
                        warmup_epochs=0), tmp_path / "run", steps=1)  # fmt: skip
    export_checkpoint(first, tmp_path / "export")
    load_backbone(tmp_path / "export")
    out = capsys.readouterr().out
    assert f"init continued from {weights_file.resolve()}" in out
    assert json.loads((tmp_path / "export" / "config.json").read_text())["scratchpath"]["init"]


def test_eval_prints_the_init_of_a_continued_export(
    batch, weights_file, tmp_path, tiles_dir, capsys
):
    source = tiles_dir / "lc25000_lung_224"
    with open(source / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for c in ("lung_aca", "lung_n"):
            writer.writerows([[r["path"], r["label"]] for r in rows if r["label"] == c][:6])
    import_tiles(source, tmp_path / "store", labels_csv=tmp_path / "labels.csv", tile_size=32)
    first = _fit(batch, SimCLR(backbone=ARCH, backbone_kwargs=TINY_VIT, init=str(weights_file),
                        warmup_epochs=0), tmp_path / "run", steps=1)  # fmt: skip
    export_checkpoint(first, tmp_path / "export")
    capsys.readouterr()
    code = main(["eval", "--model", str(tmp_path / "export"), "--data", str(tmp_path / "store"),
                 "--split", "0.5", "--k", "3", "--linear-epochs", "2",
                 "--out", str(tmp_path / "ev")])  # fmt: skip
    assert code == 0
    assert f"model init: continued from {weights_file.resolve()}" in capsys.readouterr().out
