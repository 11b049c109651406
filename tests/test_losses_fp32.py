"""Each objective's loss is computed in float32 under bf16 autocast.

The loss functions themselves (logits, softmax, einsum, MSE) are compared on the same features:
under ``torch.autocast("cpu", torch.bfloat16)`` they must agree with their float32 value within
1e-4 relative, both for float32 features and for bf16 features (what a bf16 head returns).
Without the float32 islands the bf16 matmuls are off by 1e-3 to 1e-2.
"""

from __future__ import annotations

import pytest
import torch

from objective_helpers import one_torch_thread  # noqa: F401
from scratchpath.objectives.dino import dino_loss, koleo_loss
from scratchpath.objectives.mae import mae_loss
from scratchpath.objectives.mocov3 import mocov3_loss
from scratchpath.objectives.simclr import nt_xent_loss


def _features(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


LOSSES = {
    "simclr": lambda f: nt_xent_loss(f[0], f[1], temperature=0.1),
    "mocov3": lambda f: mocov3_loss(f[0], f[1], temperature=0.2),
    "dino": lambda f: dino_loss(f[2] * 3, f[3] * 3, torch.zeros(4096), 0.1, 0.04),
    "koleo": lambda f: koleo_loss(f[0]),
    "mae": lambda f: mae_loss(f[4], f[5], (f[6] > 0).float()),
}


@pytest.fixture(scope="module")
def features() -> list[torch.Tensor]:
    return [
        _features(0, 256, 128),  # SimCLR / MoCo v3 projections (B, D): the two views of an
        _features(0, 256, 128) + 0.3 * _features(1, 256, 128),  # image agree, as after training
        _features(2, 6, 64, 4096),  # DINO student logits (V, B, K)
        _features(3, 2, 64, 4096),  # DINO teacher logits (G, B, K)
        _features(4, 16, 49, 192),  # MAE prediction, target (B, L, P), mask (B, L)
        _features(5, 16, 49, 192),
        _features(6, 16, 49),
    ]


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("inputs", ["float32", "bfloat16"])
def test_loss_under_bf16_autocast_equals_its_float32_value(name, inputs, features):
    if inputs == "bfloat16":  # what a bf16 layer hands the loss; the reference sees the same
        features = [f.bfloat16() for f in features]
    reference = LOSSES[name]([f.float() for f in features])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = LOSSES[name](features)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, reference, rtol=1e-4, atol=0)


def test_bf16_matmul_logits_would_be_visibly_off(features):
    """The check above could fail: the plain bf16 contrastive logits differ by far more."""
    q = torch.nn.functional.normalize(features[0], dim=1)
    k = torch.nn.functional.normalize(features[1], dim=1)
    exact = torch.nn.functional.cross_entropy(q @ k.T / 0.1, torch.arange(256))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rough = torch.nn.functional.cross_entropy(q @ k.T / 0.1, torch.arange(256))
    assert abs(float(rough) - float(exact)) / float(exact) > 1e-3
