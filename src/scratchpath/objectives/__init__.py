"""Self-supervised objectives, one file each; ``OBJECTIVES`` maps the CLI name to the class."""

from __future__ import annotations

from scratchpath.objectives.base import SSLObjective
from scratchpath.objectives.dino import DINO
from scratchpath.objectives.dinov2 import DINOv2
from scratchpath.objectives.mae import MAE
from scratchpath.objectives.mocov3 import MoCoV3
from scratchpath.objectives.simclr import SimCLR

OBJECTIVES: dict[str, type[SSLObjective]] = {
    "simclr": SimCLR,
    "mocov3": MoCoV3,
    "dino": DINO,
    "dinov2": DINOv2,
    "mae": MAE,
}

__all__ = ["DINO", "MAE", "OBJECTIVES", "DINOv2", "MoCoV3", "SSLObjective", "SimCLR"]
