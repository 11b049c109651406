"""Optimisers and per-step schedules shared by every objective.

The recipe of the SSL papers (SimCLR, MoCo v3, DINO, MAE): the base LR is given for a global batch
of ``lr_reference_batch`` and scaled linearly (Goyal et al. 2017), warmed up linearly from 0 and
decayed with a half cosine to ``min_lr``; weight decay follows its own cosine from
``weight_decay`` to ``weight_decay_end`` and never touches biases, norms, positional embeddings or
tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from timm.optim import Lars
from torch import nn

from scratchpath.errors import ScratchpathError


def warmup_cosine(step: int, total_steps: int, peak: float, end: float, warmup_steps: int) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then a half cosine to ``end``."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """Half cosine from ``start`` (step 0) to ``end`` (last step): weight decay, EMA momentum."""
    return warmup_cosine(step, total_steps, start, end, warmup_steps=0)


def scaled_lr(lr: float, global_batch: int, lr_reference_batch: int) -> float:
    """The linear scaling rule: ``lr × global_batch / lr_reference_batch``."""
    return lr * global_batch / lr_reference_batch


def param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    no_weight_decay: set[str],
    lr_scales: dict[str, float] | None = None,
) -> list[dict]:
    """Split trainable parameters into decayed groups and groups that are never decayed.

    Biases and every 1-D parameter (norm scales and shifts) are not decayed, nor are the names in
    ``no_weight_decay`` (positional embeddings, class / register / mask tokens). With
    ``lr_scales`` (name → LR multiplier, e.g. :func:`layerwise_lr_scales`) there is one group
    per (decay, multiplier); each group's ``lr_scale`` multiplies the scheduled LR.
    """
    groups: dict[tuple[bool, float], dict] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        excluded = param.ndim <= 1 or name.endswith(".bias") or name in no_weight_decay
        scale = (lr_scales or {}).get(name, 1.0)
        group = groups.setdefault(
            (not excluded, scale),
            {"params": [], "apply_weight_decay": not excluded, "lr_scale": scale},
        )
        if excluded:
            group["weight_decay"] = 0.0
        group["params"].append(param)
    return sorted(groups.values(), key=lambda g: (not g["apply_weight_decay"], -g["lr_scale"]))


def layerwise_lr_scales(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    num_blocks: int,
    decay: float,
    patch_embed_lr_mult: float = 1.0,
    prefix: str = "backbone.",
) -> dict[str, float]:
    """Layer-wise LR decay of a ViT (BEiT; DINOv2's ``get_vit_lr_decay_rate``).

    Block i (0-based) of ``num_blocks`` gets ``decay^(num_blocks − i)``; the patch embedding,
    positional embedding and class / register tokens (layer 0) get ``decay^(num_blocks + 1)``,
    the patch embedding times ``patch_embed_lr_mult``; the final norm and every parameter outside
    ``prefix`` (heads) keep 1.
    """
    scales = {}
    for name, _ in named_parameters:
        if not name.startswith(prefix):
            continue
        local = name[len(prefix) :]
        if local.startswith("blocks."):
            layer = int(local.split(".")[1]) + 1
        elif local.startswith(("patch_embed", "pos_embed", "cls_token", "reg_token")):
            layer = 0
        else:
            continue
        scale = decay ** (num_blocks + 1 - layer)
        if local.startswith("patch_embed"):
            scale *= patch_embed_lr_mult
        scales[name] = scale
    return scales


def create_optimizer(
    name: str, groups: list[dict], *, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.Optimizer:
    """AdamW, or LARS (You et al. 2017; timm's ``Lars``, momentum 0.9) as in SimCLR / MoCo v3.

    LARS adapts the update by the trust ratio only in the decayed group: biases and norms are
    excluded from the adaptation, as in both papers. The LR set here is replaced at every step.
    """
    for group in groups:
        group.setdefault("weight_decay", weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=betas)
    if name == "lars":
        for group in groups:
            group["always_adapt"] = group["apply_weight_decay"]
        return Lars(groups, lr=0.0, momentum=0.9, trust_coeff=0.001)
    raise ScratchpathError(f"optimizer: must be 'adamw' or 'lars', not {name!r}")
