"""Crop grouping of multi-crop objectives (objectives/crops.py): one rule for DINO and DINOv2."""

from __future__ import annotations

import pytest
import torch

from objective_helpers import one_torch_thread  # noqa: F401
from scratchpath.errors import ScratchpathError
from scratchpath.objectives import DINO, DINOv2
from scratchpath.objectives.crops import forward_runs, runs_of_equal_size


def _crops(sides: list[int], batch: int = 2) -> list[torch.Tensor]:
    return [torch.full((batch, 3, s, s), float(i)) for i, s in enumerate(sides)]


def test_consecutive_crops_of_one_size_form_a_run_in_view_order():
    crops = _crops([32, 32, 16, 16, 16, 32])
    runs = runs_of_equal_size(crops)
    assert [tuple(r.shape) for r in runs] == [(4, 3, 32, 32), (6, 3, 16, 16), (2, 3, 32, 32)]
    # view order kept inside and across runs: view i's rows hold the value i
    assert torch.cat([r[:, 0, 0, 0] for r in runs]).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_forward_runs_makes_one_pass_per_run_and_keeps_view_order():
    calls = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x.mean((1, 2, 3))[:, None]  # (n, 1)

    out = torch.cat(forward_runs(forward, _crops([32, 32, 16, 16, 16])))
    assert calls == [(4, 3, 32, 32), (6, 3, 16, 16)]
    assert out[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_a_size_the_backbone_rejects_is_a_one_line_error():
    def fixed_size(x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == 32, "Input width (16) doesn't match model (32)."
        return x

    with pytest.raises(ScratchpathError, match=r"^backbone_kwargs: \(16, 16\) crops do not fit"):
        forward_runs(fixed_size, _crops([32, 16]))


FIXED_SIZE = {"img_size": 32, "patch_size": 8, "depth": 1}


@pytest.mark.parametrize(
    "make",
    [
        lambda: DINO(backbone="vit_tiny_patch16_224", backbone_kwargs=FIXED_SIZE, out_dim=16,
                     hidden_dim=16, bottleneck_dim=8),
        lambda: DINOv2(backbone="vit_small_patch14_reg4_dinov2", out_dim=16, hidden_dim=16,
                       bottleneck_dim=8, backbone_kwargs={**FIXED_SIZE, "embed_dim": 48,
                                                          "num_heads": 2}),
    ],
    ids=["dino", "dinov2"],
)  # fmt: skip
def test_dino_and_dinov2_group_local_crops_by_the_same_rule(make):
    """Both reject local crops a fixed-size ViT cannot take with the same clear error."""
    module = make()
    views = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 2
    with pytest.raises(ScratchpathError, match="dynamic_img_size: true for multi-crop"):
        module.compute_loss(views)
