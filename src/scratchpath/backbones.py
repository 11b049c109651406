"""Vision backbones created from scratch through timm's model contract.

Any ``timm`` architecture works (``vit_small_patch16_224``, ``vit_little_patch16_reg4_gap_256``,
``resnet50``, ``convnext_tiny``, ...): a backbone is what ``timm.create_model(name,
num_classes=0)`` returns, so ``model(x)`` gives pooled ``(B, D)`` features,
``model.forward_features(x)`` the token / feature map and :func:`feature_dim` is ``D``.
Weights are never downloaded: scratchpath trains from scratch.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from scratchpath.errors import ScratchpathError


def create_backbone(
    name: str, *, activation_checkpointing: bool = False, **kwargs: Any
) -> nn.Module:
    """Create the timm model ``name`` with random weights and no classifier head.

    Args:
        name: a timm model name (``timm.list_models()``), optionally with a ``.tag``.
        activation_checkpointing: recompute activations in the backward pass to save memory
            (timm's ``set_grad_checkpointing``).
        **kwargs: passed to ``timm.create_model``, e.g. ``img_size=224``, ``patch_size=16``,
            ``drop_path_rate=0.1``, ``dynamic_img_size=True`` (ViTs fed multi-crop views).

    Raises:
        ScratchpathError: unknown model name, ``pretrained`` requested, or a keyword argument the
            architecture does not accept.
    """
    if "pretrained" in kwargs:
        raise ScratchpathError(
            "backbone_kwargs.pretrained: scratchpath trains backbones from scratch; remove it"
        )
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ScratchpathError(f"backbone: unknown timm model {name!r}{hint}")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as error:
        raise ScratchpathError(
            f"backbone_kwargs: {name} rejects {sorted(kwargs)}: {error}"
        ) from None
    if activation_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def feature_dim(model: nn.Module) -> int:
    """Size ``D`` of the pooled features ``model(x)`` returns: timm's ``head_hidden_size`` (the
    pre-logits width, e.g. ``2 × num_features`` for a CNN with ``global_pool="catavgmax"``),
    else ``num_features``."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def prepare_input(
    tiles: torch.Tensor,
    *,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    input_size: int | None = None,
) -> torch.Tensor:
    """Tiles ``(B, 3, H, W)`` on the 0..255 scale (uint8 or float, any device) -> the
    normalised float32 ``(B, 3, S, S)`` a backbone takes.

    ``mean``/``std`` are per RGB channel on the 0..1 scale. When ``input_size`` is given and
    differs from the tile size, tiles are resized with bilinear interpolation (antialiased when
    shrinking): the whole tile is seen at another µm/px, never cropped. This is the
    preprocessing an export's ``pretrained_cfg`` states (``interpolation: bilinear``,
    ``crop_pct: 1``); ``eval`` and ``embed`` both use it.
    """
    x = tiles.float() / 255.0
    if input_size is not None and tuple(x.shape[-2:]) != (input_size, input_size):
        x = F.interpolate(
            x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True
        )
    # mean/std may already be tensors on the device (embed keeps them there: building them
    # from Python floats per batch would be a pageable copy, i.e. a host sync, per batch)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
