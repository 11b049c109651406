"""Checkpoint -> backbone-only safetensors + ``config.json`` + model card; loading it back.

An export folder holds:

- ``model.safetensors``: the backbone's weights with exactly the keys of
  ``timm.create_model(architecture, num_classes=0, **model_kwargs)``, so a strict load works;
- ``config.json``: architecture and kwargs, preprocessing (input size, mean/std, µm/px), the
  training provenance (objective, step, store fingerprints, resolved config, git SHA) and a
  timm ``pretrained_cfg`` block;
- ``README.md``: a model card.

Only :func:`export_checkpoint` ever reads a pickle (with ``torch.load(weights_only=True)``,
which refuses anything but tensors and plain containers); loading an export never unpickles.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from scratchpath import __version__
from scratchpath.backbones import create_backbone
from scratchpath.errors import ScratchpathError
from scratchpath.files import file_sha256

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
EXPORT_FORMAT_VERSION = 1
_PREFIXES = {"student": "backbone.", "teacher": "teacher_backbone."}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint safely (``weights_only=True``) and check it is scratchpath's.

    Raises:
        ScratchpathError: missing file, not a checkpoint, a pickle that needs arbitrary code, or
            no ``scratchpath`` metadata (not written by a scratchpath objective).
    """
    path = Path(path)
    if not path.is_file():
        raise ScratchpathError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise ScratchpathError(
                f"{path}: refusing to unpickle {found.group(1)}: the checkpoint holds Python "
                "objects other than tensors and plain containers (loading would run their code)"
            ) from None
        raise ScratchpathError(f"{path}: not a PyTorch checkpoint (unreadable pickle)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ScratchpathError(f"{path}: not a PyTorch checkpoint ({_first_line(err)})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ScratchpathError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    meta = checkpoint.get("scratchpath")
    if not isinstance(meta, dict) or not meta.get("backbone"):
        raise ScratchpathError(
            f"{path}: no 'scratchpath' metadata (not written by a scratchpath objective)"
        )
    return checkpoint


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def backbone_state_dict(
    state_dict: dict[str, torch.Tensor], which: Literal["teacher", "student"]
) -> dict[str, torch.Tensor]:
    """Keys of one backbone with its prefix and any ``torch.compile`` ``_orig_mod.`` removed."""
    prefix = _PREFIXES[which]
    out = {}
    for key, value in state_dict.items():
        key = key.replace("_orig_mod.", "")  # torch.compile wraps modules as `_orig_mod`
        if key.startswith(prefix):
            out[key[len(prefix) :]] = value
    return out


def has_teacher(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether the checkpoint holds an EMA teacher backbone."""
    return any(k.replace("_orig_mod.", "").startswith("teacher_backbone.") for k in state_dict)


def _load_strict(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = sorted(
        k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape
    )
    if missing or unexpected or mismatched:
        parts = [
            f"{len(keys)} {what} (e.g. {keys[0]})"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape-mismatched", mismatched),
            )
            if keys
        ]
        raise ScratchpathError(
            f"{source}: weights do not match the architecture: {', '.join(parts)} keys"
        )
    model.load_state_dict(weights, strict=True)


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


def build_config(
    checkpoint: dict[str, Any],
    model: nn.Module,
    which: str,
    source: Path,
) -> dict[str, Any]:
    """The ``config.json`` content for an export of ``model`` from ``checkpoint``."""
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
    stores = data.get("stores") or []
    return {
        "format": "scratchpath-backbone",
        "format_version": EXPORT_FORMAT_VERSION,
        "architecture": arch,
        "model_kwargs": kwargs,
        "num_features": int(getattr(model, "num_features", 0)),
        "weights": which,
        "input_size": [3, size, size],
        "mean": mean,
        "std": std,
        "normalisation_source": norm_source,
        "mpp": data.get("mpp"),
        "tile_size": data.get("tile_size"),
        "objective": meta.get("objective"),
        "global_step": meta.get("global_step", checkpoint.get("global_step")),
        "epoch": checkpoint.get("epoch"),
        "stores": [
            {k: s.get(k) for k in ("path", "fingerprint", "n_tiles")}
            for s in stores
            if isinstance(s, dict)
        ],
        "training_config": meta.get("config"),
        "git_sha": meta.get("git_sha"),
        "checkpoint_version": meta.get("version"),
        "scratchpath_version": __version__,
        "source_checkpoint": {"name": source.name, "sha256": file_sha256(source)},
        "pretrained_cfg": {
            "architecture": arch,
            "tag": "scratchpath",
            "input_size": [3, size, size],
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": mean,
            "std": std,
            "num_classes": 0,
            "description": f"{meta.get('objective')} pretrained from scratch on H&E (scratchpath)",
        },
    }


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
    export never leaves a half-written model. Returns ``out_dir``.
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
    if which not in _PREFIXES:
        raise ScratchpathError(f"which: expected 'teacher' or 'student', got {which!r}")
    if which == "teacher" and not has_teacher(state_dict):
        raise ScratchpathError(f"{ckpt}: has no teacher backbone; export with --which student")
    weights = backbone_state_dict(state_dict, which)
    if not weights:
        raise ScratchpathError(f"{ckpt}: state_dict has no '{_PREFIXES[which]}*' weights")
    meta = checkpoint["scratchpath"]
    model = create_backbone(meta["backbone"], **(meta.get("backbone_kwargs") or {}))
    _load_strict(model, weights, f"{ckpt} ({which} backbone as {meta['backbone']})")
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
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def render_model_card(config: dict[str, Any]) -> str:
    """The ``README.md`` model card of an export, from its ``config.json`` content."""
    arch, kwargs = config["architecture"], config.get("model_kwargs") or {}
    size = config["input_size"][-1]
    mpp = config.get("mpp")
    mpp_text = f"{mpp:.3g} µm/px" if isinstance(mpp, int | float) else "unknown µm/px"
    stores = config.get("stores") or []
    store_lines = "\n".join(
        f"- `{s.get('path')}` ({s.get('n_tiles')} tiles, fingerprint `{s.get('fingerprint')}`)"
        for s in stores
    )
    kw = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    pcfg = config["pretrained_cfg"]
    return f"""# {arch} pretrained from scratch on H&E with scratchpath ({config.get("objective")})

A **{arch}** backbone ({config.get("num_features")}-d embeddings), trained from random \
initialisation on H&E histopathology tiles only by self-supervised learning \
(objective `{config.get("objective")}`, {config.get("weights")} weights, \
step {config.get("global_step")}), trained from git commit `{config.get("git_sha")}` and \
exported with scratchpath {config.get("scratchpath_version")}.

## Input
RGB tiles of {size}×{size} px at **{mpp_text}** (training tiles: {config.get("tile_size")} px), \
scaled to 0..1 and normalised with mean {pcfg["mean"]} and std {pcfg["std"]} \
(from the {config.get("normalisation_source")}).
Feed tiles at the training µm/px: the same pixels at another magnification are another input.

## Training data
{store_lines or "- (no store information recorded)"}

The resolved training configuration is the `training_config` field of `config.json`.

## Intended use and limits
Intended for research: a frozen feature extractor or an initialisation for fine-tuning on H&E
tiles (linear probes, kNN, MIL aggregation, segmentation heads). Not a medical device; not
validated for diagnosis. The backbone has only seen the stores above: expect it to degrade on
other stains, scanners, organs and magnifications, and check it on your own data (for example
with `scratchpath eval`, which also reports a random-init and a colour-histogram baseline).

## Loading
With scratchpath (strict load from safetensors, eval mode, `(B, D)` embeddings):
```python
import scratchpath
model = scratchpath.load_backbone("path/to/this/folder")
fmaps = scratchpath.load_backbone("path/to/this/folder", features_only=True)  # feature maps
```
With plain timm (`num_classes=0` keeps the load strict):
```python
import json, timm
folder = "path/to/this/folder"
cfg = json.load(open(f"{{folder}}/config.json"))
model = timm.create_model(
    "{arch}", pretrained=True, num_classes=0{kw},
    pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=f"{{folder}}/model.safetensors"),
)
```
With kaiko's eva (YAML `backbone:` of a config):
```yaml
backbone:
  class_path: eva.vision.models.wrappers.TimmModel
  init_args:
    model_name: {arch}
    checkpoint_path: path/to/this/folder/model.safetensors
    model_kwargs: {json.dumps({"num_classes": 0, **kwargs})}
```
or through scratchpath itself:
```yaml
backbone:
  class_path: eva.core.models.wrappers.ModelFromFunction
  init_args:
    path: scratchpath.load_backbone
    arguments:
      model_dir: path/to/this/folder
```
Use eva transforms with the mean/std above and resize to {size} px.
"""


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def load_config(model_dir: str | Path) -> dict[str, Any]:
    """Read an export's ``config.json`` (architecture, preprocessing, provenance)."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise ScratchpathError(f"{model_dir}: not a scratchpath export (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScratchpathError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(config, dict) or "architecture" not in config:
        raise ScratchpathError(f"{path}: missing field 'architecture'")
    return config


class FeatureMaps(nn.Module):
    """A backbone returning intermediate feature maps ``[(B, C, h, w), ...]`` (timm's
    ``forward_intermediates``) instead of pooled embeddings."""

    def __init__(self, backbone: nn.Module, indices: int | Sequence[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.indices = indices
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.forward_intermediates(x, indices=self.indices, intermediates_only=True)


def load_backbone(
    model_dir: str | Path,
    *,
    features_only: bool = False,
    out_indices: int | Sequence[int] = 4,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load an exported backbone (eval mode) from a folder written by :func:`export_checkpoint`.

    Args:
        model_dir: the export folder (``model.safetensors`` + ``config.json``).
        features_only: return a module whose forward gives a list of feature maps
            ``(B, C, h, w)`` (timm ``forward_intermediates``; ``out_indices`` = the last n blocks
            as an int, or block indices) instead of pooled ``(B, D)`` embeddings. The pooled
            model also has ``forward_features`` (the token / feature map before pooling).
        device: where to put the model.

    The model's ``pretrained_cfg`` carries the preprocessing (``input_size``, ``mean``,
    ``std``, ``interpolation``), so ``timm.data.resolve_data_config(model=model)`` works; the
    full config, with µm/px, is :func:`load_config`. Weights are read strictly from safetensors
    (no unpickling); a config that does not match the weights raises ScratchpathError.
    """
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    weights_path = model_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ScratchpathError(f"{model_dir}: no {WEIGHTS_FILE}")
    try:
        weights = load_file(weights_path)
    except (SafetensorError, OSError) as err:
        raise ScratchpathError(f"{weights_path}: unreadable safetensors ({err})") from None
    model = create_backbone(config["architecture"], **(config.get("model_kwargs") or {}))
    _load_strict(model, weights, f"{weights_path} (as {config['architecture']})")
    preprocessing = {  # tuples, as timm's own pretrained_cfg holds them
        k: tuple(v) if isinstance(v, list) else v for k, v in config["pretrained_cfg"].items()
    }
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **preprocessing}
    model = FeatureMaps(model, out_indices) if features_only else model
    return model.to(device).eval()
