"""Loading an export folder back as a timm backbone (pooled, dense patch features or feature
maps), strictly and without unpickling."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from scratchpath.backbones import create_backbone
from scratchpath.errors import ScratchpathError
from scratchpath.weights import (
    WEIGHTS_FILE,
    config_init,
    describe_init,
    load_config,
    load_strict,
    read_safetensors,
)


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
    verbose: bool = True,
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
        verbose: print one line naming the model and how its weights began (from scratch, or
            the file, sha256 and architecture it was continued from).

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
    weights, _ = read_safetensors(weights_path)
    model = create_backbone(config["architecture"], **config["model_args"])
    load_strict(model, weights, f"{weights_path} (as {config['architecture']})")
    preprocessing = {  # tuples, as timm's own pretrained_cfg holds them
        k: tuple(v) if isinstance(v, list) else v for k, v in config["pretrained_cfg"].items()
    }
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **preprocessing}
    if verbose:
        print(f"{model_dir}: {config['architecture']}, init {describe_init(config_init(config))}")
    if dense:
        model = PatchFeatures(model)
    elif features_only:
        model = FeatureMaps(model, out_indices)
    return model.to(device).eval()
