"""Vision backbones created from scratch through timm's model contract.

Any ``timm`` architecture works (``vit_small_patch16_224``, ``vit_little_patch16_reg4_gap_256``,
``resnet50``, ``convnext_tiny``, ...): a backbone is what ``timm.create_model(name,
num_classes=0)`` returns, so ``model(x)`` gives pooled ``(B, D)`` features,
``model.forward_features(x)`` the token / feature map and :func:`feature_dim` is ``D``.
Weights are never downloaded: scratchpath trains from scratch.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
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
