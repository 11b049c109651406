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

- the provenance includes ``init``: how the weights began (from scratch, or the file, its
  sha256 and architecture they were continued from; :mod:`scratchpath.weights`), which
  :func:`load_backbone`, ``scratchpath eval`` and ``scratchpath compare`` print.

The package is split by job: ``checkpoint`` (reading a training checkpoint), ``config``
(``config.json``), ``card`` (the model card, from the ``model_card.md`` template; its eva
section from :mod:`scratchpath.eva_configs`), ``write`` (:func:`export_checkpoint`), ``load``
(:func:`load_backbone`), ``hub`` (:func:`push_to_hub`).

Exports written before format 2 (``model_kwargs`` and provenance at the top level) still load:
:func:`load_config` reads them into the current layout.

Only :func:`export_checkpoint` ever reads a pickle (with ``torch.load(weights_only=True)``,
which refuses anything but tensors and plain containers); loading an export never unpickles.
"""

from __future__ import annotations

from scratchpath.export.card import render_model_card
from scratchpath.export.checkpoint import backbone_state_dict, has_teacher, read_checkpoint
from scratchpath.export.config import EXPORT_FORMAT_VERSION, build_config
from scratchpath.export.hub import push_to_hub
from scratchpath.export.load import FeatureMaps, PatchFeatures, load_backbone
from scratchpath.export.write import CARD_FILE, export_checkpoint
from scratchpath.weights import CONFIG_FILE, FORMAT_NAME, WEIGHTS_FILE, load_config

__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "EXPORT_FORMAT_VERSION",
    "FORMAT_NAME",
    "WEIGHTS_FILE",
    "FeatureMaps",
    "PatchFeatures",
    "backbone_state_dict",
    "build_config",
    "export_checkpoint",
    "has_teacher",
    "load_backbone",
    "load_config",
    "push_to_hub",
    "read_checkpoint",
    "render_model_card",
]
