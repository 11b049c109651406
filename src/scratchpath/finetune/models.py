"""The models ``scratchpath eval`` and ``scratchpath compare`` take, by spec string, each with its
own preprocessing (input size, mean, std) and the record of how its weights began.

Specs:

- ``DIR``: an export folder (``scratchpath export``): its architecture, weights, input size and
  normalisation;
- ``random:DIR``: the random-init twin of an export (same architecture, ``model_args``, input
  size and normalisation; random weights);
- ``random:TIMM_NAME``: a randomly initialised timm architecture (H&E normalisation);
- ``timm:TIMM_NAME@FILE``: a timm architecture started from a weights file (an export folder, a
  timm-format ``.safetensors``, or a ``.pth`` / ``.bin`` read with ``weights_only=True``; timm's
  conversions, strict: :func:`scratchpath.weights.init_backbone`) with timm's preprocessing for
  that architecture (e.g. ImageNet mean/std at 224 px for published natural-image weights).

``random:`` and ``timm:`` specs take timm keyword arguments after ``?`` (YAML values, ``&``
between them), e.g. ``timm:vit_small_patch14_dinov2@w/dinov2_vits14.pth?img_size=224``;
``input_size`` and ``mean`` / ``std`` there set the preprocessing instead of timm's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from scratchpath.augment import HE_MEAN, HE_STD
from scratchpath.backbones import create_backbone
from scratchpath.errors import ScratchpathError
from scratchpath.export import load_backbone, load_config
from scratchpath.weights import config_init, from_scratch, init_backbone

RANDOM_PREFIX = "random:"
TIMM_PREFIX = "timm:"
_PREPROCESSING_KEYS = ("input_size", "mean", "std")


def parse_key_values(
    items: Sequence[str], source: str, expected: str = "KEY=VALUE"
) -> dict[str, Any]:
    """``["img_size=64", "dynamic_img_size=true"]`` -> ``{"img_size": 64, ...}`` (YAML values);
    an item that is not ``expected`` or a value YAML cannot read is one error naming ``source``."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ScratchpathError(f"{source}: expected {expected}, got {item!r}")
        try:
            kwargs[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ScratchpathError(f"{source}: cannot parse the value of {key}") from None
    return kwargs


def parse_query(spec: str, text: str) -> dict[str, Any]:
    """``"img_size=224&drop_path_rate=0"`` -> ``{"img_size": 224, "drop_path_rate": 0}``."""
    return parse_key_values(
        [item for item in text.split("&") if item], spec, expected="KEY=VALUE after '?'"
    )


def _split_query(spec: str) -> tuple[str, dict[str, Any]]:
    body, _, query = spec.partition("?")
    return body, parse_query(spec, query)


def resolve_model(
    spec: str, model_kwargs: dict[str, Any] | None = None, *, seed: int = 0
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a spec (see the module docstring) in eval mode, and its settings:
    ``architecture``, ``model_kwargs``, ``mean``, ``std``, ``input_size`` (None: tiles as
    stored), ``init`` (the init record; None when the model folder records none).

    ``model_kwargs`` (``eval --model-kwargs``) add timm kwargs to a ``random:`` or ``timm:``
    spec; random weights are drawn with ``seed``.
    """
    if spec.startswith(RANDOM_PREFIX):
        return _random(spec, model_kwargs, seed)
    if spec.startswith(TIMM_PREFIX):
        return _timm_with_weights(spec, model_kwargs)
    if model_kwargs:
        raise ScratchpathError("--model-kwargs: only for random:NAME models (exports fix them)")
    if not Path(spec).is_dir():
        raise ScratchpathError(
            f"{spec}: not an export folder (models: DIR, random:DIR, random:TIMM_NAME, "
            "timm:TIMM_NAME@FILE)"
        )
    config = load_config(spec)
    model = load_backbone(spec, verbose=False)
    preprocessing = config["pretrained_cfg"]
    return model, {
        "architecture": config["architecture"],
        "model_kwargs": config["model_args"],
        "mean": list(preprocessing["mean"]),
        "std": list(preprocessing["std"]),
        "input_size": _side(preprocessing.get("input_size")),
        "mpp": config["scratchpath"].get("mpp"),
        "init": config_init(config),
    }


def _random(
    spec: str, model_kwargs: dict[str, Any] | None, seed: int
) -> tuple[nn.Module, dict[str, Any]]:
    body, query = _split_query(spec[len(RANDOM_PREFIX) :])
    kwargs = {**query, **(model_kwargs or {})}
    preprocessing = {k: kwargs.pop(k) for k in _PREPROCESSING_KEYS if k in kwargs}
    if Path(body).is_dir():  # the twin of an export: its architecture and preprocessing
        config = load_config(body)
        arch, kwargs = config["architecture"], {**config["model_args"], **kwargs}
        pcfg = config["pretrained_cfg"]
        info = {"mean": list(pcfg["mean"]), "std": list(pcfg["std"]),
                "input_size": _side(pcfg.get("input_size"))}  # fmt: skip
    else:
        arch, info = body, {"mean": list(HE_MEAN), "std": list(HE_STD), "input_size": None}
    model = random_model(arch, kwargs, seed=seed)
    if info["input_size"] is None:
        info["input_size"] = _side(
            kwargs.get("img_size") or getattr(getattr(model, "patch_embed", None), "img_size", None)
        )
    info.update({k: _preprocessing_value(k, v) for k, v in preprocessing.items()})
    return model, {"architecture": arch, "model_kwargs": kwargs, **info, "init": from_scratch()}


def _timm_with_weights(
    spec: str, model_kwargs: dict[str, Any] | None
) -> tuple[nn.Module, dict[str, Any]]:
    body, query = _split_query(spec[len(TIMM_PREFIX) :])
    arch, sep, path = body.partition("@")
    if not sep or not arch or not path:
        raise ScratchpathError(f"{spec}: expected timm:TIMM_NAME@FILE")
    kwargs = {**query, **(model_kwargs or {})}
    preprocessing = {k: kwargs.pop(k) for k in _PREPROCESSING_KEYS if k in kwargs}
    model = create_backbone(arch, **kwargs)
    init = init_backbone(model, path, architecture=arch)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    info = {
        "mean": list(cfg.get("mean", HE_MEAN)),
        "std": list(cfg.get("std", HE_STD)),
        "input_size": _side(
            kwargs.get("img_size")
            or getattr(getattr(model, "patch_embed", None), "img_size", None)
            or cfg.get("input_size")
        ),
    }
    info.update({k: _preprocessing_value(k, v) for k, v in preprocessing.items()})
    return model.eval(), {"architecture": arch, "model_kwargs": kwargs, **info, "init": init}


def _preprocessing_value(key: str, value: Any) -> Any:
    if key == "input_size":
        return _side(value)
    if not (isinstance(value, list) and len(value) == 3):
        raise ScratchpathError(f"{key}: expected three numbers [r, g, b], got {value!r}")
    return [float(v) for v in value]


def random_model(arch: str, kwargs: dict[str, Any], *, seed: int) -> nn.Module:
    """A randomly initialised timm backbone (eval mode) whose weights depend only on ``seed``."""
    torch.manual_seed(seed)
    return create_backbone(arch, **kwargs).eval()


def _side(size: Any) -> int | None:
    if size is None:
        return None
    return int(size[-1]) if isinstance(size, Sequence) else int(size)
