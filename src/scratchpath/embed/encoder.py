"""The frozen encoder of ``embed``: an export loaded with :func:`load_backbone`, its
preprocessing, its precision, and the provenance a rerun compares before reusing files."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

import torch

from scratchpath import __version__
from scratchpath.backbones import feature_dim, prepare_input
from scratchpath.errors import ScratchpathError
from scratchpath.export import WEIGHTS_FILE, load_backbone, load_config
from scratchpath.files import file_sha256

Precision = Literal["fp32", "bf16", "fp16"]
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """``device`` as given, else this process's GPU (``cuda:LOCAL_RANK``) when there is one,
    else the CPU."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ScratchpathError(f"--device: {device} requested but CUDA is not available")
    return device


def use_device(device: torch.device) -> None:
    """Make ``device`` this process's current GPU (nvJPEG handles, caching allocator)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


class Encoder:
    """An exported backbone ready to embed ``(B, 3, H, W)`` tiles on ``device``.

    Args:
        model_dir: an export folder (``scratchpath export``).
        device: where the forward pass runs.
        precision: ``"fp32"``, or autocast to ``"bf16"`` / ``"fp16"`` (the default on CUDA is
            bf16, as the foundation-model tools run their encoders; fp32 elsewhere).
        features_dtype: what the files store (``"float16"`` halves them).
        input_size: resize tiles to this (default: the export's training input size).
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: torch.device,
        *,
        precision: Precision | None = None,
        features_dtype: Literal["float32", "float16"] = "float32",
        input_size: int | None = None,
    ) -> None:
        model_dir = Path(model_dir)
        config = load_config(model_dir)
        if precision is None:
            precision = "bf16" if device.type == "cuda" else "fp32"
        if precision not in ("fp32", "bf16", "fp16"):
            raise ScratchpathError(f"--precision: expected fp32, bf16 or fp16, got {precision!r}")
        if features_dtype not in ("float32", "float16"):
            raise ScratchpathError(f"features_dtype: float32 or float16, got {features_dtype!r}")
        self.device, self.precision, self.features_dtype = device, precision, features_dtype
        use_device(device)
        self.model = load_backbone(model_dir, device=device)
        pcfg = config["pretrained_cfg"]
        self.input_size = int(input_size or pcfg["input_size"][-1])
        self.mean, self.std = [float(v) for v in pcfg["mean"]], [float(v) for v in pcfg["std"]]
        self._mean = torch.tensor(self.mean, dtype=torch.float32, device=device)  # once, not
        self._std = torch.tensor(self.std, dtype=torch.float32, device=device)  # per batch
        prov = config.get("scratchpath") or {}
        self.export_mpp: float | None = prov.get("mpp")
        self.export_tile_size: int | None = prov.get("tile_size")
        self.num_features = feature_dim(self.model)  # what model(x) gives, pooled width
        self.provenance: dict[str, Any] = {
            "architecture": config["architecture"],
            "export": str(model_dir.resolve()),
            "export_sha256": file_sha256(model_dir / WEIGHTS_FILE),
            "input_size": self.input_size,
            "mean": self.mean,
            "std": self.std,
            "interpolation": "bilinear",
            "precision": precision,
            "features_dtype": features_dtype,
            "num_features": self.num_features,
            "training_mpp": self.export_mpp,
            "scratchpath_version": __version__,
        }

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST[self.precision])

    @torch.inference_mode()
    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` tiles on the 0..255 scale, on the device -> ``(B, D)`` float32
        features on the device (no host synchronisation)."""
        x = prepare_input(tiles, mean=self._mean, std=self._std, input_size=self.input_size)
        with self._autocast():
            return self.model(x).float().flatten(1)
