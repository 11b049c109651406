"""Checkpoint -> backbone-only safetensors + ``config.json`` + model card; loading it back.

An export folder is a timm / Hugging Face Hub model folder, so every client loads it as it
already expects (``timm.create_model("local-dir:DIR", pretrained=True)``, ``hf-hub:`` once
pushed, transformers ``TimmWrapperModel`` / ``AutoModel``, kaiko's eva, plain
``timm.create_model(arch, checkpoint_path=...)``):

- ``model.safetensors``: the backbone's weights with exactly the keys of
  ``timm.create_model(architecture, num_classes=0, **model_args)``, so a strict load works;
- ``config.json``: timm's model config (``architecture``, ``num_classes: 0``, ``num_features``,
  ``model_args``, ``pretrained_cfg`` with input size, mean/std, interpolation, crop settings and
  the µm/px in its description and notes) plus one key of scratchpath's own, ``scratchpath``:
  the provenance (objective, step, weights, µm/px, stores, resolved recipe, git SHA, checkpoint
  hash) that timm and transformers ignore;
- ``README.md``: a model card (Hub front matter; how to load it with each client).

Exports written before format 2 (``model_kwargs`` and provenance at the top level) still load:
:func:`load_config` reads them into the current layout.

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
from scratchpath.eva_configs import eva_section
from scratchpath.files import file_sha256, readable_as_umask

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
EXPORT_FORMAT_VERSION = 2
FORMAT_NAME = "scratchpath-backbone"
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


def _fixed_input_size(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether the backbone only accepts its training size (timm's ``fixed_input_size``)."""
    if kwargs.get("dynamic_img_size") or kwargs.get("strict_img_size") is False:
        return False
    return bool((getattr(model, "pretrained_cfg", None) or {}).get("fixed_input_size", False))


def _mpp_text(mpp: Any) -> str:
    return f"{mpp:.3g} µm/px" if isinstance(mpp, int | float) else "an unrecorded µm/px"


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
            f"{objective} backbone pretrained from scratch on H&E tiles at {_mpp_text(mpp)} "
            "(scratchpath)"
        ),
        # PretrainedCfg has no µm/px field: notes is the free-text field timm keeps
        "notes": [
            f"mpp={mpp}: feed tiles at {mpp} µm/px (the training magnification)"
            if mpp is not None
            else "mpp unknown: the training stores record no µm/px (tiles imported without it)"
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
        "stores": [
            {k: s.get(k) for k in ("path", "fingerprint", "n_tiles")}
            for s in stores
            if isinstance(s, dict)
        ],
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
        # mkdtemp makes the folder 0700 (and writers using mkstemp files 0600): reset both to
        # what a plain mkdir / open would give, so others can load the model
        for path in (tmp, *tmp.iterdir()):
            readable_as_umask(path)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def render_model_card(config: dict[str, Any]) -> str:
    """The ``README.md`` model card of an export, from its ``config.json`` content.

    Every Python snippet in it runs as written once ``path/to/this/folder`` is the export
    (``tests/test_export_clients.py`` runs them all).
    """
    arch, kwargs = config["architecture"], config.get("model_args") or {}
    prov = config.get("scratchpath") or {}
    pcfg = config["pretrained_cfg"]
    size = pcfg["input_size"][-1]
    mpp_text = _mpp_text(prov.get("mpp"))
    stores = prov.get("stores") or []
    store_lines = "\n".join(
        f"- `{s.get('path')}` ({s.get('n_tiles')} tiles, fingerprint `{s.get('fingerprint')}`)"
        for s in stores
    )
    kw = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    objective = prov.get("objective")
    sha = prov.get("git_sha")
    commit = f"git commit `{sha}`" if sha else "an unrecorded git commit (not run from a checkout)"
    return f"""---
library_name: timm
pipeline_tag: image-feature-extraction
tags:
- image-feature-extraction
- timm
- histopathology
- scratchpath
---
# {arch} pretrained from scratch on H&E with scratchpath ({objective})

A **{arch}** backbone ({config.get("num_features")}-d embeddings), trained from random \
initialisation on H&E histopathology tiles only by self-supervised learning \
(objective `{objective}`, {prov.get("weights")} weights, step {prov.get("global_step")}), \
trained from {commit} and exported with scratchpath {prov.get("scratchpath_version")}.

## Input
RGB tiles of {size}×{size} px at **{mpp_text}** (training tiles: {prov.get("tile_size")} px), \
scaled to 0..1 and normalised with mean {pcfg["mean"]} and std {pcfg["std"]} \
(from the {prov.get("normalisation_source")}); resize {pcfg["interpolation"]}, no crop. \
`config.json`'s `pretrained_cfg` holds exactly this, so timm's \
`resolve_data_config` / `create_transform` and transformers' image processor apply it.
Feed tiles at the training µm/px: the same pixels at another magnification are another input.

## Training data
{store_lines or "- (no store information recorded)"}

The provenance (objective, step, stores, the resolved training recipe, git SHA, the sha256 of the \
source checkpoint) is the `scratchpath` key of `config.json`.

## Intended use and limits
Intended for research: a frozen feature extractor or an initialisation for fine-tuning on H&E
tiles (linear probes, kNN, MIL aggregation, segmentation heads). Not a medical device; not
validated for diagnosis. The backbone has only seen the stores above: expect it to degrade on
other stains, scanners, organs and magnifications, and check it on your own data (for example
with `scratchpath eval`, which also reports a random-init and a colour-histogram baseline).

## Loading
Every route below loads the weights strictly (every key, no classifier head) and gives the
same embeddings. With scratchpath: `(B, D)` embeddings, `(B, D, h, w)` patch features
(`dense=True`, e.g. for segmentation) or the feature maps of the last blocks:
```python
import torch
import scratchpath

model = scratchpath.load_backbone("path/to/this/folder")  # eval mode
x = torch.rand(2, 3, {size}, {size})  # stands for normalised tiles
embeddings = model(x)  # (2, {config.get("num_features")})
patches = scratchpath.load_backbone("path/to/this/folder", dense=True)(x)  # (2, D, h, w)
maps = scratchpath.load_backbone("path/to/this/folder", features_only=True)(x)  # last 4 blocks
```
With timm (`hf-hub:USER/REPO` instead of `local-dir:` once pushed), preprocessing included:
```python
import timm
import torch
from PIL import Image

model = timm.create_model("local-dir:path/to/this/folder", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
x = transform(Image.open("path/to/tile.png").convert("RGB")).unsqueeze(0)
embeddings = model(x)
```
With timm from the weights file alone (as kaiko's eva does):
```python
import timm
import torch

model = timm.create_model(
    "{arch}", num_classes=0{kw},
    checkpoint_path="path/to/this/folder/model.safetensors",
).eval()
x = torch.rand(2, 3, {size}, {size})
embeddings = model(x)
```
With Hugging Face transformers (`TimmWrapperModel`, or `AutoModel`):
```python
import torch
from transformers import AutoModel

model = AutoModel.from_pretrained("path/to/this/folder").eval()
x = torch.rand(2, 3, {size}, {size})
embeddings = model(x).pooler_output
```
{eva_section(config)}"""


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _upgrade_format_1(old: dict[str, Any]) -> dict[str, Any]:
    """A format-1 ``config.json`` (``model_kwargs``, provenance at the top level) in the
    current layout."""
    provenance_keys = ("weights", "objective", "global_step", "epoch", "mpp", "tile_size",
                       "normalisation_source", "stores", "git_sha", "checkpoint_version",
                       "scratchpath_version", "source_checkpoint", "training_config")  # fmt: skip
    pcfg = {k: v for k, v in (old.get("pretrained_cfg") or {}).items() if k != "architecture"}
    for key in ("input_size", "mean", "std"):
        pcfg.setdefault(key, old.get(key))
    return {
        "architecture": old["architecture"],
        "num_classes": 0,
        "num_features": old.get("num_features"),
        "model_args": dict(old.get("model_kwargs") or {}),
        "pretrained_cfg": pcfg,
        "scratchpath": {
            "format": FORMAT_NAME,
            "format_version": old.get("format_version", 1),
            **{k: old.get(k) for k in provenance_keys},
        },
    }


def load_config(model_dir: str | Path) -> dict[str, Any]:
    """Read an export's ``config.json``: timm's keys (``architecture``, ``model_args``,
    ``pretrained_cfg`` with the preprocessing) and ``scratchpath`` (µm/px and provenance).
    Format-1 exports are returned in this layout too."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise ScratchpathError(f"{model_dir}: not a scratchpath export (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScratchpathError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(config, dict) or "architecture" not in config:
        raise ScratchpathError(f"{path}: missing field 'architecture'")
    if "model_kwargs" in config or config.get("format") == FORMAT_NAME:
        config = _upgrade_format_1(config)
    if not isinstance(config.get("pretrained_cfg"), dict):
        raise ScratchpathError(f"{path}: missing field 'pretrained_cfg'")
    config.setdefault("model_args", {})
    config.setdefault("scratchpath", {})
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


class PatchFeatures(nn.Module):
    """A backbone returning dense features ``(B, D, h, w)``: one ``D``-vector per patch (ViT:
    the last block's patch tokens after the final norm, class / register tokens dropped, as
    ``forward_features`` gives them; CNN: the last stage's map), for segmentation heads.
    ``.flatten(2).transpose(1, 2)`` gives the tokens as ``(B, h * w, D)``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", {})
        self.num_features = getattr(backbone, "num_features", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.backbone.forward_intermediates(
            x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        return maps[-1]


def load_backbone(
    model_dir: str | Path,
    *,
    dense: bool = False,
    features_only: bool = False,
    out_indices: int | Sequence[int] = 4,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load an exported backbone (eval mode) from a folder written by :func:`export_checkpoint`.

    Args:
        model_dir: the export folder (``model.safetensors`` + ``config.json``; current and
            format-1 exports).
        dense: return a :class:`PatchFeatures` module whose forward gives patch features
            ``(B, D, h, w)`` (one embedding per patch, e.g. for segmentation) instead of
            pooled ``(B, D)`` embeddings.
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
    if dense and features_only:
        raise ScratchpathError("load_backbone: choose dense or features_only, not both")
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    weights_path = model_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ScratchpathError(f"{model_dir}: no {WEIGHTS_FILE}")
    try:
        weights = load_file(weights_path)
    except (SafetensorError, OSError) as err:
        raise ScratchpathError(f"{weights_path}: unreadable safetensors ({err})") from None
    model = create_backbone(config["architecture"], **config["model_args"])
    _load_strict(model, weights, f"{weights_path} (as {config['architecture']})")
    preprocessing = {  # tuples, as timm's own pretrained_cfg holds them
        k: tuple(v) if isinstance(v, list) else v for k, v in config["pretrained_cfg"].items()
    }
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **preprocessing}
    if dense:
        model = PatchFeatures(model)
    elif features_only:
        model = FeatureMaps(model, out_indices)
    return model.to(device).eval()


def push_to_hub(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Add scratchpath backbone",
) -> str:
    """Upload an export folder to the Hugging Face Hub as model repository ``repo_id`` (created
    when missing); it then loads with ``timm.create_model("hf-hub:REPO", pretrained=True)`` or
    ``AutoModel.from_pretrained("REPO")``. The token is ``token``, else ``HF_TOKEN`` or the one
    ``hf auth login`` stored. Returns the URL of the commit.

    Raises:
        ScratchpathError: not an export, or the Hub refused or could not be reached (offline,
            ``HF_HUB_OFFLINE=1``, no or a wrong token); the local export is untouched.
    """
    model_dir = Path(model_dir)
    load_config(model_dir)  # an export, not any folder
    if not (model_dir / WEIGHTS_FILE).is_file():
        raise ScratchpathError(f"{model_dir}: no {WEIGHTS_FILE}")
    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name="scratchpath", library_version=__version__)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=model_dir,
            allow_patterns=[WEIGHTS_FILE, CONFIG_FILE, CARD_FILE],
            commit_message=commit_message,
        )
    # huggingface_hub raises its own, httpx's and OSError types for the same causes (offline,
    # no route, bad token, refused name); to the user they are all one failed upload
    except Exception as err:
        raise ScratchpathError(
            f"--push-to-hub: {repo_id}: upload failed ({_first_line(err)}); the export in "
            f"{model_dir} is complete, push it later with the same command"
        ) from None
    return str(getattr(commit, "commit_url", commit))
