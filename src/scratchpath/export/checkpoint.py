"""Reading a scratchpath training checkpoint: the one place an export ever unpickles (with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from scratchpath.errors import ScratchpathError
from scratchpath.weights import torch_load_weights_only

PREFIXES = {"student": "backbone.", "teacher": "teacher_backbone."}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint safely (``weights_only=True``) and check it is scratchpath's.

    Raises:
        ScratchpathError: missing file, not a checkpoint, a pickle that needs arbitrary code, or
            no ``scratchpath`` metadata (not written by a scratchpath objective).
    """
    path = Path(path)
    if not path.is_file():
        raise ScratchpathError(f"{path}: no such checkpoint file")
    checkpoint = torch_load_weights_only(path, "checkpoint")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ScratchpathError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    meta = checkpoint.get("scratchpath")
    if not isinstance(meta, dict) or not meta.get("backbone"):
        raise ScratchpathError(
            f"{path}: no 'scratchpath' metadata (not written by a scratchpath objective)"
        )
    return checkpoint


def backbone_state_dict(
    state_dict: dict[str, torch.Tensor], which: Literal["teacher", "student"]
) -> dict[str, torch.Tensor]:
    """Keys of one backbone with its prefix and any ``torch.compile`` ``_orig_mod.`` removed."""
    prefix = PREFIXES[which]
    out = {}
    for key, value in state_dict.items():
        key = key.replace("_orig_mod.", "")  # torch.compile wraps modules as `_orig_mod`
        if key.startswith(prefix):
            out[key[len(prefix) :]] = value
    return out


def has_teacher(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether the checkpoint holds an EMA teacher backbone."""
    return any(k.replace("_orig_mod.", "").startswith("teacher_backbone.") for k in state_dict)
