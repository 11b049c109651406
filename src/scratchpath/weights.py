"""Backbone weight files: reading them safely, matching them to a timm architecture, and the
record of how a backbone's weights began (its *init*).

Three kinds of file hold backbone weights:

- an **export folder** (``scratchpath export``; any timm / Hugging Face Hub model folder with a
  ``model.safetensors`` and a timm ``config.json``): the config names the architecture and, for
  scratchpath's own exports, how *those* weights began;
- a **safetensors file** in timm's key layout (``timm.create_model(..., pretrained=True)``'s
  files, ``save_file(model.state_dict())``);
- a **torch pickle** (``.pth``, ``.pt``, ``.bin``, ``.ckpt``) read with
  ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers: the
  published DINO / DINOv2 / torchvision files, timm training checkpoints (``state_dict``,
  ``state_dict_ema``), DINO's full checkpoints (``teacher``), scratchpath's Lightning checkpoints
  (``teacher_backbone.`` / ``backbone.``).

:func:`init_backbone` loads one into a freshly created backbone the way timm loads pretrained
weights (its architecture's ``checkpoint_filter_fn`` converts foreign layouts and resamples
position / patch embeddings to the model's grid, as ``timm.create_model(pretrained=True)``
does; classifier-head weights are dropped, the backbone has none), strictly by default, and
returns the *init record*: the file, its sha256, the architectures and what was loaded, missing,
unexpected or reshaped. Checkpoints and exports carry that record, so a backbone continued from
given weights can never pass for one trained from scratch. Nothing is ever downloaded.

This module sits between ``backbones`` and (``objectives``, ``export``): both the training
objectives (``init``) and the export reader (:func:`load_config`, :func:`load_strict`) use it.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from scratchpath.errors import ScratchpathError
from scratchpath.files import file_sha256

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_NAME = "scratchpath-backbone"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Containers of a torch file, in the order they are looked for: an EMA copy first (timm's
# use_ema default), DINO's full checkpoint's teacher, then the usual state-dict keys.
_CONTAINERS = ("state_dict_ema", "model_ema", "teacher", "state_dict", "model")
# Prefixes under which a checkpoint holds the backbone: scratchpath's EMA teacher and online
# backbone (Lightning checkpoints), DINO's student/teacher wrappers.
_BACKBONE_PREFIXES = ("teacher_backbone.", "backbone.")
_WRAPPERS = ("module.", "_orig_mod.")  # DDP and torch.compile


# --- the init record ------------------------------------------------------------------------
def from_scratch() -> dict[str, Any]:
    """The init record of a backbone that started from random weights."""
    return {"kind": "scratch"}


def is_from_scratch(record: dict[str, Any] | None) -> bool:
    """Whether an init record says random initialisation (None: no record, not from scratch)."""
    return isinstance(record, dict) and record.get("kind") == "scratch"


def describe_init(record: dict[str, Any] | None) -> str:
    """One line saying how a backbone's weights began, following an export's own history."""
    if not isinstance(record, dict):
        return "unrecorded (the file or folder does not say how its weights began)"
    if record.get("kind") == "scratch":
        return "from scratch (random initialisation)"
    if record.get("kind") != "file":
        return f"unrecognised init record {record!r}"
    source = record.get("source_architecture") or "architecture not recorded in the file"
    text = (
        f"continued from {record.get('path')} (sha256 {str(record.get('sha256'))[:16]}…, "
        f"{record.get('format')}, {source}; loaded into {record.get('architecture')}: "
        f"{_counts(record)})"
    )
    if isinstance(record.get("source_init"), dict):
        text += f"; that file's weights began {describe_init(record['source_init'])}"
    return text


def _counts(record: dict[str, Any]) -> str:
    parts = [f"{record.get('loaded')} tensors loaded"]
    for key in ("missing", "unexpected", "mismatched", "reshaped", "dropped"):
        names = record.get(key) or []
        if names or key in ("missing", "unexpected"):
            parts.append(f"{len(names)} {key}")
    return ", ".join(parts)


def format_init_report(record: dict[str, Any]) -> str:
    """The report :func:`init_backbone` prints: one line, then one per reshaped / skipped key."""
    lines = [f"init: {describe_init(record)}"]
    for what in ("reshaped", "missing", "unexpected", "mismatched", "dropped"):
        for entry in (record.get(what) or [])[:20]:
            lines.append(f"  {what}: {entry}")
        if len(record.get(what) or []) > 20:
            lines.append(f"  {what}: … {len(record[what]) - 20} more")
    return "\n".join(lines)


# --- reading files ----------------------------------------------------------------------------
@dataclass
class WeightsFile:
    """The tensors of a weights file and what the file says about them."""

    path: Path  # the file read (``model.safetensors`` inside an export folder)
    format: str  # "scratchpath export", "model folder", "safetensors" or "torch pickle"
    state_dict: dict[str, torch.Tensor]
    architecture: str | None = None  # as recorded by the file, if it records one
    init: dict[str, Any] | None = None  # the file's own init record (exports, checkpoints)
    notes: list[str] = field(default_factory=list)  # containers entered, prefixes taken


def torch_load_weights_only(path: str | Path, what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, memory-mapped when the file allows;
    a pickle that needs arbitrary code or is not a torch file is one clear error."""
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise ScratchpathError(
                f"{path}: refusing to unpickle {found.group(1)}: the {what} holds Python "
                "objects other than tensors and plain containers (loading would run their code)"
            ) from None
        raise ScratchpathError(f"{path}: not a PyTorch {what} (unreadable pickle)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ScratchpathError(f"{path}: not a PyTorch {what} ({first_line(err)})") from None


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


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


def config_init(config: dict[str, Any]) -> dict[str, Any] | None:
    """The init record of an export's config (:func:`load_config`): scratchpath exports from
    before init records began from scratch; other model folders record none (None)."""
    provenance = config.get("scratchpath") or {}
    if provenance.get("format") != FORMAT_NAME:
        return None
    return provenance.get("init") or pre_init_record()


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (no unpickling)."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(path), metadata
    except (SafetensorError, OSError) as err:
        raise ScratchpathError(f"{path}: unreadable safetensors ({first_line(err)})") from None


def read_weights(source: str | Path) -> WeightsFile:
    """Read the backbone weights of an export folder, a safetensors file or a torch file.

    Raises:
        ScratchpathError: no such file, an unknown suffix, an unreadable file, a pickle that
            needs arbitrary code, or no tensors found.
    """
    path = Path(source)
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise ScratchpathError(f"{path}: a folder without {WEIGHTS_FILE} (not an export)")
        state, metadata = read_safetensors(weights)
        architecture, init, kind = metadata.get("architecture"), None, "model folder"
        if (path / CONFIG_FILE).is_file():
            config = load_config(path)
            architecture, init = config["architecture"], config_init(config)
            kind = "model folder" if init is None else "scratchpath export"
        return WeightsFile(weights, kind, state, architecture, init)
    if not path.is_file():
        raise ScratchpathError(f"{path}: no such weights file or export folder")
    if path.suffix == ".safetensors":
        state, metadata = read_safetensors(path)
        return WeightsFile(path, "safetensors", state, metadata.get("architecture"))
    if path.suffix not in TORCH_SUFFIXES:
        raise ScratchpathError(
            f"{path}: unknown weights file type {path.suffix!r} (expected an export folder, "
            f".safetensors, or a torch file: {', '.join(TORCH_SUFFIXES)})"
        )
    return _from_torch_object(path, torch_load_weights_only(path))


def pre_init_record() -> dict[str, Any]:
    """The init record of exports and checkpoints written before init records existed:
    scratchpath could then only train from random weights."""
    return {**from_scratch(), "note": "recorded before init existed: always from scratch then"}


def _from_torch_object(path: Path, obj: Any) -> WeightsFile:
    notes: list[str] = []
    init = None
    if isinstance(obj, dict) and isinstance(obj.get("scratchpath"), dict):
        meta = obj["scratchpath"]  # a scratchpath Lightning checkpoint
        init = meta.get("init") or pre_init_record()
        architecture: str | None = meta.get("backbone")
    else:
        architecture = None
    while isinstance(obj, dict):
        container = next((k for k in _CONTAINERS if isinstance(obj.get(k), dict)), None)
        if container is None:
            break
        notes.append(f"took the file's '{container}' entry")
        obj = obj[container]
    if not isinstance(obj, dict):
        raise ScratchpathError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    state = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            for wrapper in _WRAPPERS:
                key = key.replace(wrapper, "")
            state[key] = value
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            notes.append(f"took the keys under '{prefix}'")
            break
    if not state:
        raise ScratchpathError(f"{path}: no tensors found (not a state dict)")
    return WeightsFile(path, "torch pickle", state, architecture, init, notes)


# --- matching weights to a model ------------------------------------------------------------
@dataclass
class KeyMatch:
    """How a state dict's keys and shapes compare to a model's."""

    missing: list[str]  # in the model, not in the weights
    unexpected: list[str]  # in the weights, not in the model
    mismatched: list[str]  # in both with different shapes ("key: (a) vs model (b)")

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """``"2 missing (e.g. a), 1 unexpected (e.g. b)"`` for the non-empty kinds."""
        return ", ".join(
            f"{len(keys)} {what} (e.g. {keys[0]})"
            for what, keys in (
                ("missing", self.missing),
                ("unexpected", self.unexpected),
                ("shape-mismatched", self.mismatched),
            )
            if keys
        )


def match_keys(model: nn.Module, weights: dict[str, torch.Tensor]) -> KeyMatch:
    """Compare ``weights`` with ``model.state_dict()`` key by key and shape by shape."""
    expected = model.state_dict()
    return KeyMatch(
        missing=sorted(set(expected) - set(weights)),
        unexpected=sorted(set(weights) - set(expected)),
        mismatched=sorted(
            f"{k}: {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in set(expected) & set(weights)
            if expected[k].shape != weights[k].shape
        ),
    )


def load_strict(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load ``weights`` into ``model`` when every key and shape matches, else one clear error."""
    match = match_keys(model, weights)
    if not match.exact:
        raise ScratchpathError(
            f"{source}: weights do not match the architecture: {match.summary()} keys"
        )
    model.load_state_dict(weights, strict=True)


def _timm_filter(model: nn.Module) -> Any:
    """The ``checkpoint_filter_fn`` of the model's timm module (what ``pretrained=True`` uses
    to convert foreign layouts and resample position / patch embeddings), if it has one."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the classifier head timm names for this architecture."""
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return tuple(f"{h}." for h in heads)


def init_backbone(
    model: nn.Module, source: str | Path, *, architecture: str, strict: bool = True
) -> dict[str, Any]:
    """Load the weights of ``source`` into the freshly created backbone ``model`` and return
    the init record.

    ``source`` is an export folder, a safetensors file or a torch file (see the module
    docstring). The weights pass through the architecture's timm ``checkpoint_filter_fn``
    (DINOv2 / CLIP layouts converted, position embeddings resampled to the model's grid, patch
    embeddings to its patch size) and lose any classifier-head keys; then every key and shape
    must match (``strict``), or, with ``strict=False``, the matching keys are loaded, the
    model's other weights stay random and the rest is listed as missing / unexpected.

    Raises:
        ScratchpathError: unreadable file, a filter that cannot convert it, a strict mismatch,
            or no key in common at all.
    """
    weights_file = read_weights(source)
    state = weights_file.state_dict
    label = f"init: {source}"
    filter_fn = _timm_filter(model)
    if filter_fn is not None:
        try:
            filtered = filter_fn(dict(state), model)
        except Exception as err:  # timm's filters raise whatever their conversion hits
            raise ScratchpathError(
                f"{label}: timm's checkpoint filter for {architecture} cannot convert these "
                f"weights ({first_line(err)})"
            ) from None
    else:
        filtered = dict(state)
    reshaped = sorted(
        f"{k}: {tuple(state[k].shape)} -> {tuple(v.shape)}"
        for k, v in filtered.items()
        if k in state and state[k].shape != v.shape
    )
    expected = model.state_dict()
    heads = _head_prefixes(model)
    dropped = sorted(k for k in filtered if k not in expected and heads and k.startswith(heads))
    filtered = {k: v for k, v in filtered.items() if k not in dropped}
    match = match_keys(model, filtered)
    if strict and not match.exact:
        raise ScratchpathError(
            f"{label}: the weights do not fit {architecture}: {match.summary()} keys "
            "(the model is the recipe's backbone with its backbone_kwargs; init_strict: false "
            "loads the keys that fit and leaves the rest random)"
        )
    bad_shapes = {entry.split(":")[0] for entry in match.mismatched}
    loadable = {k: v for k, v in filtered.items() if k in expected and k not in bad_shapes}
    if not loadable:
        raise ScratchpathError(
            f"{label}: no weight of the file fits {architecture} ({match.summary()} keys)"
        )
    model.load_state_dict(loadable, strict=False)
    return {
        "kind": "file",
        "path": str(Path(source).resolve()),
        "file": weights_file.path.name,
        "sha256": file_sha256(weights_file.path),
        "format": weights_file.format,
        "source_architecture": weights_file.architecture,
        "architecture": architecture,
        "strict": strict,
        "loaded": len(loadable),
        "missing": match.missing,
        "unexpected": match.unexpected,
        "mismatched": match.mismatched,
        "reshaped": reshaped,
        "dropped": [f"{k} (classifier head)" for k in dropped],
        "notes": weights_file.notes,
        "source_init": weights_file.init,
    }
