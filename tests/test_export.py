"""Export of checkpoint backbones to safetensors and loading them back (scratchpath, timm)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import ClassVar

import lightning as L
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from objective_helpers import one_torch_thread, real_views  # noqa: F401  (autouse fixture)
from scratchpath.backbones import create_backbone
from scratchpath.cli import main
from scratchpath.errors import ScratchpathError
from scratchpath.export import export_checkpoint, load_backbone, load_config
from scratchpath.objectives import DINO, OBJECTIVES

ARCH = "vit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2}
MEAN, STD = [0.70, 0.55, 0.75], [0.15, 0.18, 0.12]


def _backbone(seed: int, arch: str = ARCH, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_backbone(arch, **(kwargs or KWARGS))


def _checkpoint(path: Path, *, teacher: bool = True, **extra) -> dict:
    """A checkpoint in the objectives' contract format (docs/architecture.md)."""
    state = {f"backbone.{k}": v for k, v in _backbone(0).state_dict().items()}
    if teacher:
        state |= {f"teacher_backbone.{k}": v for k, v in _backbone(1).state_dict().items()}
    state["projection_head.weight"] = torch.zeros(4, 4)  # objective parts are not exported
    checkpoint = {
        "state_dict": state,
        "global_step": 7,
        "epoch": 1,
        "hyper_parameters": {"backbone": ARCH, "backbone_kwargs": dict(KWARGS), "lr": 1e-3},
        "scratchpath": {
            "version": "0.1.0",
            "objective": "dino",
            "backbone": ARCH,
            "backbone_kwargs": dict(KWARGS),
            "global_step": 7,
            "data": {
                "mpp": 0.5,
                "tile_size": 224,
                "mean": MEAN,
                "std": STD,
                "stores": [{"path": "/stores/a", "fingerprint": "abc123", "n_tiles": 10}],
            },
            "config": "model:\n  lr: 0.001\n",
            "git_sha": "deadbeef",
        },
    } | extra
    torch.save(checkpoint, path)
    return checkpoint


def _assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


@pytest.fixture
def real_tiles(tiles_dir: Path) -> torch.Tensor:
    """Four real LC25000 tiles, resized to the tiny model's 32 px and normalised."""
    return real_tiles_of(tiles_dir)


def real_tiles_of(tiles_dir: Path) -> torch.Tensor:
    files = sorted((tiles_dir / "lc25000_lung_224" / "lung_n").glob("*.jpeg"))[:4]
    arrays = [np.asarray(Image.open(f).convert("RGB").resize((32, 32))) for f in files]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A default (teacher) export of :func:`_checkpoint`, shared by the read-only checks."""
    tmp = tmp_path_factory.mktemp("exported")
    _checkpoint(tmp / "a.ckpt")
    return export_checkpoint(tmp / "a.ckpt", tmp / "out")


def test_export_then_load_gives_checkpoint_teacher_embeddings(exported, real_tiles):
    model = load_backbone(exported)
    expected = _backbone(1).eval()(real_tiles)
    assert not model.training
    assert model(real_tiles).shape == (4, 192)
    torch.testing.assert_close(model(real_tiles), expected, atol=1e-6, rtol=0)


def test_student_export_holds_student_weights(tmp_path, real_tiles):
    _checkpoint(tmp_path / "a.ckpt")
    export_checkpoint(tmp_path / "a.ckpt", tmp_path / "out", which="student")
    model = load_backbone(tmp_path / "out")
    _assert_same(model(real_tiles), _backbone(0).eval()(real_tiles))
    assert load_config(tmp_path / "out")["scratchpath"]["weights"] == "student"


def test_teacherless_checkpoint_exports_student_by_default(tmp_path, real_tiles):
    _checkpoint(tmp_path / "a.ckpt", teacher=False)
    export_checkpoint(tmp_path / "a.ckpt", tmp_path / "out")
    model = load_backbone(tmp_path / "out")
    _assert_same(model(real_tiles), _backbone(0).eval()(real_tiles))


def test_teacher_requested_on_teacherless_checkpoint_is_refused(tmp_path):
    _checkpoint(tmp_path / "a.ckpt", teacher=False)
    with pytest.raises(ScratchpathError, match="no teacher"):
        export_checkpoint(tmp_path / "a.ckpt", tmp_path / "out", which="teacher")
    assert not (tmp_path / "out").exists()


def test_safetensors_keys_are_exactly_timms(exported):
    keys = set(load_file(exported / "model.safetensors"))
    assert keys == set(timm.create_model(ARCH, num_classes=0, **KWARGS).state_dict())


def test_compiled_module_prefixes_are_stripped(tmp_path, real_tiles):
    checkpoint = _checkpoint(tmp_path / "a.ckpt")
    state = {
        k.replace("teacher_backbone.", "teacher_backbone._orig_mod."): v
        for k, v in checkpoint["state_dict"].items()
    }
    torch.save(checkpoint | {"state_dict": state}, tmp_path / "compiled.ckpt")
    export_checkpoint(tmp_path / "compiled.ckpt", tmp_path / "out")
    model = load_backbone(tmp_path / "out")
    _assert_same(model(real_tiles), _backbone(1).eval()(real_tiles))


def _assert_holds_exactly(model: torch.nn.Module, weights: Path) -> None:
    """Strict: the model has every key of the file and no other (no head), with its values."""
    exported = load_file(weights)
    assert set(model.state_dict()) == set(exported)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exported.items())


def test_plain_timm_loads_export_strictly_via_pretrained_cfg_overlay(exported, real_tiles):
    weights = exported / "model.safetensors"
    cfg = load_config(exported)
    model = timm.create_model(
        ARCH,
        pretrained=True,
        pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=str(weights)),
        num_classes=0,
        **cfg["model_args"],
    ).eval()
    _assert_holds_exactly(model, weights)
    _assert_same(model(real_tiles), _backbone(1).eval()(real_tiles))
    assert list(timm.data.resolve_data_config(model=model)["mean"]) == MEAN


def test_plain_timm_loads_export_by_checkpoint_path(exported, real_tiles):
    weights = exported / "model.safetensors"
    model = timm.create_model(ARCH, num_classes=0, checkpoint_path=str(weights), **KWARGS).eval()
    _assert_holds_exactly(model, weights)
    _assert_same(model(real_tiles), _backbone(1).eval()(real_tiles))


def test_config_is_a_timm_model_config_with_provenance_under_its_own_key(exported):
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["architecture"] == ARCH and cfg["model_args"] == KWARGS
    assert cfg["num_classes"] == 0 and cfg["num_features"] == 192
    pcfg = cfg["pretrained_cfg"]
    timm.models.PretrainedCfg(**pcfg)  # every key is one timm knows
    assert pcfg["input_size"] == [3, 32, 32] and pcfg["mean"] == MEAN and pcfg["std"] == STD
    assert pcfg["num_classes"] == 0 and pcfg["interpolation"] == "bilinear"
    assert pcfg["crop_pct"] == 1.0 and pcfg["crop_mode"] == "center"
    assert "0.5 µm/px" in pcfg["description"] and pcfg["notes"][0].startswith("mpp=0.5")
    prov = cfg["scratchpath"]
    assert prov["mpp"] == 0.5 and prov["tile_size"] == 224 and prov["format_version"] == 2
    assert prov["objective"] == "dino" and prov["global_step"] == 7
    assert prov["git_sha"] == "deadbeef" and prov["weights"] == "teacher"
    assert prov["stores"][0]["fingerprint"] == "abc123"
    assert prov["training_config"].startswith("model:")
    assert len(prov["source_checkpoint"]["sha256"]) == 64
    assert not {"model_kwargs", "mean", "std", "mpp", "objective"} & set(cfg)  # format 1 keys


def test_model_card_explains_loading_with_every_client(exported):
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n")  # Hub front matter
    for needle in ("load_backbone", "local-dir:", "checkpoint_path=", "AutoModel",
                   "eva.vision.models.wrappers.TimmModel", "MODEL_EXTRA_KWARGS"):  # fmt: skip
        assert needle in card
    assert "0.5 µm/px" in card and "abc123" in card


def _format_1_config(cfg: dict) -> dict:
    """The config.json scratchpath wrote before format 2, from a current one."""
    prov, pcfg = cfg["scratchpath"], cfg["pretrained_cfg"]
    provenance = ("weights", "normalisation_source", "mpp", "tile_size", "objective",
                  "global_step", "epoch", "stores", "training_config", "git_sha",
                  "checkpoint_version", "source_checkpoint")  # fmt: skip
    return {
        "format": "scratchpath-backbone",
        "format_version": 1,
        "architecture": cfg["architecture"],
        "model_kwargs": cfg["model_args"],
        "num_features": cfg["num_features"],
        "input_size": pcfg["input_size"],
        "mean": pcfg["mean"],
        "std": pcfg["std"],
        **{k: prov[k] for k in provenance},
        "scratchpath_version": "0.1.0",
        "pretrained_cfg": {
            "architecture": cfg["architecture"],
            "tag": "scratchpath",
            **{k: pcfg[k] for k in ("input_size", "interpolation", "crop_pct", "crop_mode")},
            "mean": pcfg["mean"],
            "std": pcfg["std"],
            "num_classes": 0,
            "description": "dino pretrained from scratch on H&E (scratchpath)",
        },
    }


def test_format_1_export_still_loads(exported, tmp_path, real_tiles):
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_bytes((exported / "model.safetensors").read_bytes())
    (old / "config.json").write_text(json.dumps(_format_1_config(load_config(exported))))
    _assert_same(load_backbone(old)(real_tiles), _backbone(1).eval()(real_tiles))
    cfg = load_config(old)
    assert cfg["model_args"] == KWARGS and cfg["pretrained_cfg"]["mean"] == MEAN
    assert cfg["scratchpath"]["mpp"] == 0.5 and cfg["scratchpath"]["format_version"] == 1
    assert "architecture" not in cfg["pretrained_cfg"]


@pytest.mark.parametrize(
    ("umask", "folder", "file"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)]
)
def test_export_files_get_the_permissions_of_the_umask(tmp_path, umask, folder, file):
    _checkpoint(tmp_path / "a.ckpt")
    previous = os.umask(umask)
    try:
        out = export_checkpoint(tmp_path / "a.ckpt", tmp_path / "out")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == folder
    for name in ("model.safetensors", "config.json", "README.md"):
        assert stat.S_IMODE((out / name).stat().st_mode) == file, name


class Payload:
    """A custom class: unpickling it would require importing and running arbitrary code."""


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    checkpoint = _checkpoint(tmp_path / "a.ckpt")
    torch.save(checkpoint | {"callback": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(ScratchpathError, match=r"refusing to unpickle .*Payload") as err:
        export_checkpoint(tmp_path / "evil.ckpt", tmp_path / "out")
    assert "\n" not in str(err.value)


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    with pytest.raises(ScratchpathError, match="no such checkpoint"):
        export_checkpoint(tmp_path / "nope.ckpt", tmp_path / "out")


def test_non_checkpoint_file_is_a_clear_error(tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(ScratchpathError, match="not a PyTorch checkpoint"):
        export_checkpoint(tmp_path / "notes.ckpt", tmp_path / "out")


def test_checkpoint_without_scratchpath_metadata_is_refused(tmp_path):
    checkpoint = _checkpoint(tmp_path / "a.ckpt")
    del checkpoint["scratchpath"]
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    with pytest.raises(ScratchpathError, match="no 'scratchpath' metadata"):
        export_checkpoint(tmp_path / "plain.ckpt", tmp_path / "out")


def test_checkpoint_weights_not_matching_its_architecture_are_refused(tmp_path):
    checkpoint = _checkpoint(tmp_path / "a.ckpt")
    checkpoint["scratchpath"]["backbone_kwargs"] = {**KWARGS, "depth": 3}
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(ScratchpathError, match="do not match the architecture: 1"):
        export_checkpoint(tmp_path / "bad.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_with_wrong_architecture_in_config_is_refused(tmp_path):
    _checkpoint(tmp_path / "a.ckpt")
    export_checkpoint(tmp_path / "a.ckpt", tmp_path / "out")
    cfg_path = tmp_path / "out" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architecture"] = "vit_small_patch16_224"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ScratchpathError, match="do not match the architecture"):
        load_backbone(tmp_path / "out")


def test_load_from_folder_without_export_is_a_clear_error(tmp_path):
    with pytest.raises(ScratchpathError, match="not a scratchpath export"):
        load_backbone(tmp_path)


def test_features_only_returns_feature_maps(exported, real_tiles):
    maps = load_backbone(exported, features_only=True, out_indices=2)(real_tiles)
    assert [tuple(m.shape) for m in maps] == [(4, 192, 4, 4)] * 2


def test_dense_gives_the_vit_patch_tokens_as_a_map(exported, real_tiles):
    dense = load_backbone(exported, dense=True)(real_tiles)
    teacher = _backbone(1).eval()
    tokens = teacher.forward_features(real_tiles)[:, teacher.num_prefix_tokens :]  # (B, 16, D)
    assert dense.shape == (4, 192, 4, 4)
    _assert_same(dense.flatten(2).transpose(1, 2), tokens)


def test_dense_gives_the_last_cnn_feature_map(tmp_path, real_tiles):
    kwargs = {"channels": [8, 16, 24, 32]}
    torch.manual_seed(3)
    cnn = create_backbone("resnet10t", **kwargs).eval()
    state = {f"backbone.{k}": v for k, v in cnn.state_dict().items()}
    meta = {"objective": "simclr", "backbone": "resnet10t", "backbone_kwargs": kwargs}
    torch.save({"state_dict": state, "scratchpath": meta}, tmp_path / "cnn.ckpt")
    out = export_checkpoint(tmp_path / "cnn.ckpt", tmp_path / "out")
    _assert_same(load_backbone(out, dense=True)(real_tiles), cnn.forward_features(real_tiles))
    with pytest.raises(ScratchpathError, match="not both"):
        load_backbone(out, dense=True, features_only=True)


def test_export_refuses_to_replace_a_non_empty_folder_unless_asked(tmp_path):
    _checkpoint(tmp_path / "a.ckpt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ScratchpathError, match="not empty"):
        export_checkpoint(tmp_path / "a.ckpt", tmp_path / "out")
    export_checkpoint(tmp_path / "a.ckpt", tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_command_writes_a_loadable_folder(tmp_path, capsys):
    _checkpoint(tmp_path / "a.ckpt")
    code = main(["export", str(tmp_path / "a.ckpt"), "--out", str(tmp_path / "out")])
    assert code == 0 and "teacher" in capsys.readouterr().out
    assert load_config(tmp_path / "out")["scratchpath"]["weights"] == "teacher"


def test_export_command_reports_bad_input_as_one_line(tmp_path, capsys):
    code = main(["export", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1


def test_export_of_a_trained_dino_checkpoint_gives_its_teacher_and_student(tmp_path, tiles_dir):
    views = real_views(tiles_dir, n_images=4, n_views=2, size=32, seed=0)

    class TinyData(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            batch = {"views": views, "index": torch.arange(4)}
            return DataLoader([batch] * 3, batch_size=None)

        def describe(self) -> dict:
            store = {"path": "/s", "fingerprint": "f00d", "n_tiles": 4}
            return {"mpp": 0.5, "tile_size": 256, "mean": MEAN, "std": STD, "stores": [store]}

    torch.manual_seed(0)
    module = DINO(
        backbone=ARCH, backbone_kwargs={**KWARGS, "dynamic_img_size": True}, out_dim=128,
        hidden_dim=64, bottleneck_dim=32, lr=1e-2, warmup_epochs=0,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=TinyData())
    trainer.save_checkpoint(tmp_path / "dino.ckpt")
    export_checkpoint(tmp_path / "dino.ckpt", tmp_path / "teacher")
    export_checkpoint(tmp_path / "dino.ckpt", tmp_path / "student", which="student")
    with torch.no_grad():
        teacher = module.teacher_backbone.eval()(real_tiles_of(tiles_dir))
        student = module.backbone.eval()(real_tiles_of(tiles_dir))
    assert not torch.allclose(teacher, student, atol=1e-4)
    _assert_same(load_backbone(tmp_path / "teacher")(real_tiles_of(tiles_dir)), teacher)
    _assert_same(load_backbone(tmp_path / "student")(real_tiles_of(tiles_dir)), student)
    cfg = load_config(tmp_path / "teacher")
    assert cfg["scratchpath"]["objective"] == "dino" and cfg["scratchpath"]["global_step"] == 3
    assert cfg["pretrained_cfg"]["mean"] == MEAN


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_checkpoint_exports_its_backbone(name, tmp_path, real_tiles):
    torch.manual_seed(0)
    module = OBJECTIVES[name](backbone=ARCH, backbone_kwargs=KWARGS)
    meta = {"objective": name, "backbone": ARCH, "backbone_kwargs": KWARGS}
    torch.save({"state_dict": module.state_dict(), "scratchpath": meta}, tmp_path / "a.ckpt")
    export_checkpoint(tmp_path / "a.ckpt", tmp_path / "out")
    expected = getattr(module, "teacher_backbone", module.backbone).eval()
    with torch.no_grad():
        _assert_same(load_backbone(tmp_path / "out")(real_tiles), expected(real_tiles))


class FakeHub:
    """Stands for huggingface_hub.HfApi: records what would be uploaded (no network)."""

    calls: ClassVar[list] = []

    def __init__(self, token=None, **kwargs) -> None:
        self.token = token

    def create_repo(self, repo_id, *, private, exist_ok, repo_type):
        FakeHub.calls.append(("create_repo", repo_id, private, exist_ok, repo_type))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, allow_patterns, commit_message):
        names = sorted(p.name for p in Path(folder_path).iterdir())
        FakeHub.calls.append(("upload_folder", repo_id, names, sorted(allow_patterns)))
        return type("CommitInfo", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()


def test_export_command_pushes_the_folder_to_the_hub(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    _checkpoint(tmp_path / "a.ckpt")
    argv = ["export", str(tmp_path / "a.ckpt"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--push-to-hub", "lab/he-dino", "--private"]) == 0
    files = ["README.md", "config.json", "model.safetensors"]
    assert FakeHub.calls == [
        ("create_repo", "lab/he-dino", True, True, "model"),
        ("upload_folder", "lab/he-dino", files, files),
    ]
    assert "hf-hub:lab/he-dino" in capsys.readouterr().out


def test_push_to_hub_without_network_is_one_line_and_keeps_the_export(tmp_path, capsys):
    import huggingface_hub.constants

    _checkpoint(tmp_path / "a.ckpt")
    argv = ["export", str(tmp_path / "a.ckpt"), "--out", str(tmp_path / "out")]
    with pytest.MonkeyPatch.context() as patch:  # what HF_HUB_OFFLINE=1 sets
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        code = main([*argv, "--push-to-hub", "lab/he-dino"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: --push-to-hub: lab/he-dino: upload failed (")
    load_backbone(tmp_path / "out")  # the local export is complete
