"""Writing an export folder from a checkpoint, all or nothing."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from safetensors.torch import save_file

from scratchpath.backbones import create_backbone
from scratchpath.errors import ScratchpathError
from scratchpath.export.card import render_model_card
from scratchpath.export.checkpoint import (
    PREFIXES,
    backbone_state_dict,
    has_teacher,
    read_checkpoint,
)
from scratchpath.export.config import build_config
from scratchpath.files import readable_as_umask
from scratchpath.weights import CONFIG_FILE, WEIGHTS_FILE, load_strict

CARD_FILE = "README.md"


def export_checkpoint(
    ckpt: str | Path,
    out_dir: str | Path,
    which: Literal["teacher", "student"] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Export the backbone of a scratchpath checkpoint to ``out_dir``.

    Args:
        ckpt: a Lightning checkpoint written while training a scratchpath objective.
        out_dir: folder to create with ``model.safetensors``, ``config.json``, ``README.md``.
        which: ``"teacher"`` (the EMA teacher, the usual choice for DINO / MoCo v3) or
            ``"student"`` (the online backbone); default: the teacher when the checkpoint has
            one, else the student.
        overwrite: replace an existing non-empty ``out_dir``.

    The folder is written to a temporary sibling and renamed into place, so an interrupted
    export never leaves a half-written model; the folder and files get the permissions the
    umask gives (others can read them under the usual 022). Returns ``out_dir``.
    """
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ScratchpathError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ScratchpathError(f"{out_dir}: folder is not empty (use --overwrite to replace it)")
    checkpoint = read_checkpoint(ckpt)
    state_dict = checkpoint["state_dict"]
    if which is None:
        which = "teacher" if has_teacher(state_dict) else "student"
    if which not in PREFIXES:
        raise ScratchpathError(f"which: expected 'teacher' or 'student', got {which!r}")
    if which == "teacher" and not has_teacher(state_dict):
        raise ScratchpathError(f"{ckpt}: has no teacher backbone; export with --which student")
    weights = backbone_state_dict(state_dict, which)
    if not weights:
        raise ScratchpathError(f"{ckpt}: state_dict has no '{PREFIXES[which]}*' weights")
    meta = checkpoint["scratchpath"]
    model = create_backbone(meta["backbone"], **(meta.get("backbone_kwargs") or {}))
    load_strict(model, weights, f"{ckpt} ({which} backbone as {meta['backbone']})")
    config = build_config(checkpoint, model, which, ckpt)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        # clone: safetensors refuses tensors sharing storage, as views in a checkpoint may
        save_file(
            {k: v.detach().contiguous().clone() for k, v in weights.items()},
            tmp / WEIGHTS_FILE,
            metadata={"format": "pt", "architecture": meta["backbone"]},
        )
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n")
        (tmp / CARD_FILE).write_text(render_model_card(config))
        # mkdtemp makes the folder 0700 (and writers using mkstemp files 0600): reset both to
        # what a plain mkdir / open would give, so others can load the model
        for path in (tmp, *tmp.iterdir()):
            readable_as_umask(path)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
