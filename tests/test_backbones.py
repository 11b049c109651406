"""Backbones: any timm name, created from scratch, with a clear error for bad names / kwargs."""

from __future__ import annotations

import pytest
import timm.models._builder as timm_builder
import torch

from objective_helpers import one_torch_thread  # noqa: F401
from scratchpath.backbones import create_backbone, feature_dim
from scratchpath.errors import ScratchpathError

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 1}


@pytest.mark.parametrize(
    ("name", "kwargs", "expected_dim"),
    [
        ("vit_tiny_patch16_224", TINY_VIT, 192),
        ("vit_little_patch16_reg4_gap_256", TINY_VIT, 320),
        ("resnet18", {}, 512),
        ("resnet10t", {"channels": [8, 8, 16, 32], "global_pool": "catavgmax"}, 64),
    ],
)
def test_forward_returns_pooled_features_of_feature_dim(name, kwargs, expected_dim):
    model = create_backbone(name, **kwargs)
    features = model(torch.randn(2, 3, 32, 32))
    assert feature_dim(model) == expected_dim
    assert features.shape == (2, expected_dim)


def test_register_variant_keeps_register_tokens_in_forward_features():
    model = create_backbone("vit_little_patch16_reg4_gap_256", **TINY_VIT)
    tokens = model.forward_features(torch.randn(1, 3, 32, 32))
    assert model.num_prefix_tokens == 4
    assert tokens.shape == (1, 4 + (32 // 8) ** 2, 320)


def test_unknown_name_raises_with_close_matches():
    with pytest.raises(ScratchpathError, match=r"vit_smal_patch16_224.*vit_small_patch16_224"):
        create_backbone("vit_smal_patch16_224")


def test_unaccepted_keyword_raises_scratchpath_error_naming_it():
    with pytest.raises(ScratchpathError, match=r"backbone_kwargs: resnet18 rejects.*img_size"):
        create_backbone("resnet18", img_size=32)


def test_pretrained_request_is_refused():
    with pytest.raises(ScratchpathError, match=r"backbone_kwargs\.pretrained"):
        create_backbone("resnet18", pretrained=True)


def test_pretrained_weights_are_never_loaded(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("pretrained weights were requested")

    monkeypatch.setattr(timm_builder, "load_pretrained", fail)
    monkeypatch.setattr(timm_builder, "load_state_dict_from_hf", fail)
    # A tagged name that does have published weights is still built with random ones.
    model = create_backbone("vit_tiny_patch16_224.augreg_in21k", **TINY_VIT)
    assert feature_dim(model) == 192


def test_activation_checkpointing_keeps_outputs_and_enables_timm_flag():
    torch.manual_seed(0)
    plain = create_backbone("vit_tiny_patch16_224", **TINY_VIT)
    checkpointed = create_backbone(
        "vit_tiny_patch16_224", activation_checkpointing=True, **TINY_VIT
    )
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert checkpointed.grad_checkpointing and not plain.grad_checkpointing
    torch.testing.assert_close(checkpointed(x), plain(x))
