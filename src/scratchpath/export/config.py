"""The ``config.json`` of an export: timm's model config plus scratchpath's provenance (under
its own ``scratchpath`` key, which timm and transformers ignore), including how the weights
began (``init``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from scratchpath import __version__
from scratchpath.backbones import feature_dim
from scratchpath.files import file_sha256
from scratchpath.weights import FORMAT_NAME, describe_init, is_from_scratch, pre_init_record

EXPORT_FORMAT_VERSION = 2


def _input_size(model: nn.Module, kwargs: dict[str, Any], data: dict[str, Any]) -> int:
    """Side length the backbone was trained at (explicit kwarg > data > fixed model size)."""
    img_size = kwargs.get("img_size")
    if img_size is None and data.get("input_size"):
        img_size = data["input_size"]
    if img_size is None:
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is None:
        img_size = data.get("tile_size") or model.pretrained_cfg.get("input_size", (3, 224))[-1]
    if isinstance(img_size, Sequence):
        img_size = img_size[-1]
    return int(img_size)


def _fixed_input_size(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether the backbone only accepts its training size (timm's ``fixed_input_size``)."""
    if kwargs.get("dynamic_img_size") or kwargs.get("strict_img_size") is False:
        return False
    return bool((getattr(model, "pretrained_cfg", None) or {}).get("fixed_input_size", False))


def mpp_text(mpp: Any) -> str:
    """``"0.5 µm/px"``, or words saying it is unrecorded."""
    return f"{mpp:.3g} µm/px" if isinstance(mpp, int | float) else "an unrecorded µm/px"


def origin_text(init: dict[str, Any]) -> str:
    """``"pretrained from scratch"`` or ``"continued from <file>"`` (descriptions, card title)."""
    if is_from_scratch(init):
        return "pretrained from scratch"
    return f"continued from {Path(str(init.get('path'))).name} (not from scratch)"


def build_config(
    checkpoint: dict[str, Any],
    model: nn.Module,
    which: str,
    source: Path,
) -> dict[str, Any]:
    """The ``config.json`` content (timm's model config + ``scratchpath`` provenance) for an
    export of ``model`` from ``checkpoint``."""
    meta = checkpoint["scratchpath"]
    data = meta.get("data") or {}
    kwargs = dict(meta.get("backbone_kwargs") or {})
    kwargs.pop("activation_checkpointing", None)  # a training switch, not part of the model
    arch = meta["backbone"]
    size = _input_size(model, kwargs, data)
    default_cfg = getattr(model, "pretrained_cfg", {}) or {}
    if data.get("mean") and data.get("std"):
        mean, std, norm_source = list(data["mean"]), list(data["std"]), "training data"
    else:  # e.g. a checkpoint of a run without a PatchDataModule
        mean, std = list(default_cfg.get("mean")), list(default_cfg.get("std"))
        norm_source = "timm default (the checkpoint records no training mean/std)"
    mpp, objective = data.get("mpp"), meta.get("objective")
    stores = data.get("stores") or []
    # Checkpoints from before init records: scratchpath could only start from random weights.
    init = meta.get("init") or pre_init_record()
    pretrained_cfg = {
        "tag": "scratchpath",
        "custom_load": False,  # a native timm state dict
        "input_size": [3, size, size],
        "fixed_input_size": _fixed_input_size(model, kwargs),
        "interpolation": "bilinear",  # how scratchpath resizes tiles (finetune.tiles_to_tensor)
        "crop_pct": 1.0,  # tiles are whole fields of view: resize, never crop
        "crop_mode": "center",
        "mean": mean,
        "std": std,
        "num_classes": 0,
        "first_conv": default_cfg.get("first_conv"),
        "classifier": default_cfg.get("classifier"),
        "description": (
            f"{objective} backbone {origin_text(init)} on H&E tiles at {mpp_text(mpp)} "
            "(scratchpath)"
        ),
        # PretrainedCfg has no µm/px field: notes is the free-text field timm keeps
        "notes": [
            f"mpp={mpp}: feed tiles at {mpp} µm/px (the training magnification)"
            if mpp is not None
            else "mpp unknown: the training stores record no µm/px (tiles imported without it)",
            f"init: {describe_init(init)}",
        ],
    }
    provenance = {
        "format": FORMAT_NAME,
        "format_version": EXPORT_FORMAT_VERSION,
        "weights": which,
        "objective": objective,
        "global_step": meta.get("global_step", checkpoint.get("global_step")),
        "epoch": checkpoint.get("epoch"),
        "mpp": mpp,
        "tile_size": data.get("tile_size"),
        "normalisation_source": norm_source,
        "embedding_dim": feature_dim(model),  # what model(x) gives (num_features is timm's)
        "stores": [
            {k: s.get(k) for k in ("path", "fingerprint", "n_tiles")}
            for s in stores
            if isinstance(s, dict)
        ],
        "init": init,
        "git_sha": meta.get("git_sha"),
        "checkpoint_version": meta.get("version"),
        "scratchpath_version": __version__,
        "source_checkpoint": {"name": source.name, "sha256": file_sha256(source)},
        "training_config": meta.get("config"),
    }
    return {
        "architecture": arch,
        "num_classes": 0,
        "num_features": int(getattr(model, "num_features", 0)),
        "global_pool": getattr(model, "global_pool", None)
        if isinstance(getattr(model, "global_pool", None), str)
        else None,
        "model_args": kwargs,
        "pretrained_cfg": pretrained_cfg,
        "scratchpath": provenance,
    }
