"""Helpers of the embedding and slide-level tests: a small export made from a seeded checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from scratchpath.backbones import create_backbone
from scratchpath.export import export_checkpoint

MEAN, STD = (0.70, 0.55, 0.72), (0.17, 0.20, 0.15)
# a small CNN (fast on 2 cores, no fixed input size) and a ViT (fixed tokens: resize matters)
CNN = ("resnet10t", {"channels": [16, 32, 64, 96]})
VIT = (
    "vit_tiny_patch16_224",
    {"img_size": 48, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2},
)


def make_export(
    folder: Path,
    *,
    mpp: float | None,
    tile_size: int,
    arch=CNN,
    seed: int = 0,
    input_size: int | None = None,
) -> Path:
    """An export of a seeded random backbone trained (as the provenance says) on ``tile_size``
    tiles at ``mpp`` µm/px, normalised with MEAN / STD."""
    name, kwargs = arch
    torch.manual_seed(seed)
    model = create_backbone(name, **kwargs)
    data = {
        "mpp": mpp,
        "tile_size": tile_size,
        "mean": MEAN,
        "std": STD,
        "input_size": input_size,
        "stores": [],
    }
    meta = {
        "version": "0.1.0",
        "objective": "simclr",
        "backbone": name,
        "backbone_kwargs": kwargs,
        "global_step": 1,
        "data": data,
        "config": None,
        "git_sha": None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 1, "scratchpath": meta}, folder / "x.ckpt")
    return export_checkpoint(folder / "x.ckpt", folder / "export", overwrite=True)
