"""Starting a backbone from given weights (scratchpath.weights): every file kind, timm's
conversions, strictness, and the init record."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from objective_helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from scratchpath.backbones import create_backbone
from scratchpath.errors import ScratchpathError
from scratchpath.export import export_checkpoint
from scratchpath.weights import describe_init, format_init_report, init_backbone, read_weights

VIT = "vit_tiny_patch16_224"
VIT_KW = {"img_size": 32, "patch_size": 8, "depth": 2}
CNN = "resnet10t"
CNN_KW = {"channels": [8, 16, 32, 64]}


def _model(arch: str, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_backbone(arch, **kwargs)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _export_of(model: torch.nn.Module, arch: str, kwargs: dict, tmp_path: Path) -> Path:
    """An export folder written by ``scratchpath export`` holding ``model``'s weights."""
    meta = {"objective": "simclr", "backbone": arch, "backbone_kwargs": kwargs, "version": 2,
            "init": {"kind": "scratch"}}  # fmt: skip
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "scratchpath": meta}, tmp_path / "src.ckpt")
    return export_checkpoint(tmp_path / "src.ckpt", tmp_path / "export")


def test_export_folder_starts_the_backbone_with_its_weights(tmp_path):
    source = _model(VIT, 1, **VIT_KW)
    folder = _export_of(source, VIT, VIT_KW, tmp_path)
    target = _model(VIT, 2, **VIT_KW)
    record = init_backbone(target, folder, architecture=VIT)
    assert _same_weights(target, source)
    assert record["kind"] == "file" and record["format"] == "scratchpath export"
    assert record["loaded"] == len(source.state_dict())
    assert record["missing"] == record["unexpected"] == record["reshaped"] == []
    assert record["source_init"] == {"kind": "scratch"}  # the export's own history travels
    assert (
        record["sha256"]
        == __import__("hashlib").sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    )


def test_timm_safetensors_with_a_classifier_head_loads_the_backbone_and_drops_the_head(tmp_path):
    torch.manual_seed(3)
    classifier = __import__("timm").create_model(CNN, num_classes=5, **CNN_KW)
    save_file(classifier.state_dict(), tmp_path / "resnet.safetensors")
    target = _model(CNN, 4, **CNN_KW)
    record = init_backbone(target, tmp_path / "resnet.safetensors", architecture=CNN)
    expected = {k: v for k, v in classifier.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(target.state_dict()[k], v) for k, v in expected.items())
    assert record["dropped"] == ["fc.bias (classifier head)", "fc.weight (classifier head)"]
    assert record["format"] == "safetensors" and record["unexpected"] == []


def test_dino_style_full_checkpoint_takes_the_teacher_backbone(tmp_path):
    teacher, student = _model(VIT, 5, **VIT_KW), _model(VIT, 6, **VIT_KW)
    wrap = lambda m: {f"module.backbone.{k}": v for k, v in m.state_dict().items()}  # noqa: E731
    torch.save({"student": wrap(student), "teacher": wrap(teacher), "epoch": 100},
               tmp_path / "dino_full.pth")  # fmt: skip
    target = _model(VIT, 7, **VIT_KW)
    record = init_backbone(target, tmp_path / "dino_full.pth", architecture=VIT)
    assert _same_weights(target, teacher)
    assert record["format"] == "torch pickle"
    assert "took the file's 'teacher' entry" in record["notes"]


def test_position_embeddings_are_resampled_to_the_recipes_grid_and_reported(tmp_path):
    source = _model(VIT, 8, **{**VIT_KW, "img_size": 64})  # 8 x 8 patches
    torch.save(source.state_dict(), tmp_path / "vit64.pth")
    target = _model(VIT, 9, **VIT_KW)  # 4 x 4 patches
    record = init_backbone(target, tmp_path / "vit64.pth", architecture=VIT)
    assert record["reshaped"] == ["pos_embed: (1, 65, 192) -> (1, 17, 192)"]
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert "1 reshaped" in format_init_report(record)
    assert "pos_embed: (1, 65, 192) -> (1, 17, 192)" in format_init_report(record)


def test_dinov2_layout_is_converted_as_timm_does(tmp_path):
    arch, kwargs = "vit_small_patch14_dinov2", {"depth": 1, "embed_dim": 32, "num_heads": 2}
    source = _model(arch, 10, img_size=56, **kwargs)  # 4 x 4 patches of 14 px
    state = dict(source.state_dict())
    state["mask_token"] = torch.zeros(1, 32)  # DINOv2's own key, which timm's filter drops
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    target = _model(arch, 11, img_size=28, **kwargs)
    record = init_backbone(target, tmp_path / "dinov2_vits14_pretrain.pth", architecture=arch)
    assert record["unexpected"] == [] and record["reshaped"] == [
        "pos_embed: (1, 17, 32) -> (1, 5, 32)"
    ]
    assert torch.equal(target.blocks[0].ls1.gamma, source.blocks[0].ls1.gamma)


def test_strict_load_refuses_weights_of_another_shape_in_one_line(tmp_path):
    torch.save(_model(CNN, 12, channels=[8, 16, 32, 48]).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ScratchpathError) as err:
        init_backbone(_model(CNN, 13, **CNN_KW), tmp_path / "other.pth", architecture=CNN)
    message = str(err.value)
    assert "\n" not in message and "shape-mismatched" in message and "other.pth" in message


def test_non_strict_load_keeps_the_rest_random_and_lists_it(tmp_path):
    source = _model(CNN, 14, **CNN_KW)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("layer4.")}
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "partial.pth")
    target = _model(CNN, 15, **CNN_KW)
    untouched = target.layer4[0].conv1.weight.clone()
    record = init_backbone(target, tmp_path / "partial.pth", architecture=CNN, strict=False)
    assert torch.equal(target.conv1[0].weight, source.conv1[0].weight)
    assert torch.equal(target.layer4[0].conv1.weight, untouched)
    assert record["unexpected"] == ["extra.weight"]
    assert record["missing"] and all(k.startswith("layer4.") for k in record["missing"])
    with pytest.raises(ScratchpathError, match="1 unexpected"):
        init_backbone(_model(CNN, 15, **CNN_KW), tmp_path / "partial.pth", architecture=CNN)


def test_a_file_with_nothing_that_fits_is_refused_even_when_not_strict(tmp_path):
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "unrelated.pth")
    with pytest.raises(ScratchpathError, match="no weight of the file fits"):
        init_backbone(_model(CNN, 0, **CNN_KW), tmp_path / "unrelated.pth", architecture=CNN,
                      strict=False)  # fmt: skip


class Payload:
    """A custom class: unpickling it would require importing and running arbitrary code."""


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1), "hook": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ScratchpathError, match=r"refusing to unpickle .*Payload"):
        read_weights(tmp_path / "evil.pth")


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing.pth", "no such weights file"), ("weights.npz", "unknown weights file type")],
)
def test_bad_init_paths_are_one_clear_error(tmp_path, name, message):
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ScratchpathError, match=message):
        read_weights(tmp_path / name)


def test_description_follows_the_history_of_an_export():
    inner = {"kind": "file", "path": "/w/imagenet.pth", "sha256": "ab" * 32,
             "format": "torch pickle", "source_architecture": None, "architecture": "resnet50",
             "loaded": 318, "missing": [], "unexpected": []}  # fmt: skip
    outer = {**inner, "path": "/w/export", "format": "scratchpath export", "source_init": inner}
    text = describe_init(outer)
    assert text.startswith("continued from /w/export") and "imagenet.pth" in text
    assert describe_init({"kind": "scratch"}).startswith("from scratch")
