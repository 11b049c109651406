"""LightningModules for supervised evaluation of a backbone: linear probe and full fine-tuning.

Both take the backbone as an export folder (``scratchpath export``) or as an ``nn.Module``
returning pooled ``(B, D)`` features, add one linear head, train with cross-entropy on
``(image, label)`` batches (e.g. from :class:`LabelledTileDataModule`) and report accuracy,
balanced accuracy and macro-F1 on the validation loader as ``val/...``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay
from torch import nn

from scratchpath.backbones import feature_dim
from scratchpath.errors import ScratchpathError
from scratchpath.export import load_backbone
from scratchpath.finetune.probes import classification_metrics


def _resolve_backbone(backbone: str | Path | nn.Module) -> nn.Module:
    if isinstance(backbone, nn.Module):
        return backbone
    return load_backbone(backbone)


def _cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class _Classifier(L.LightningModule):
    """Backbone + linear head; shared steps and metrics of the two evaluation protocols."""

    def __init__(self, backbone: str | Path | nn.Module, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ScratchpathError(f"num_classes: need >= 2, got {num_classes}")
        self.backbone = _resolve_backbone(backbone)
        if not isinstance(getattr(self.backbone, "num_features", None), int):
            raise ScratchpathError("backbone: has no integer num_features (not a timm backbone?)")
        dim = feature_dim(self.backbone)  # the pooled width (catavgmax doubles num_features)
        self.head = nn.Linear(dim, num_classes)
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, C)`` of images ``(B, 3, H, W)``."""
        return self.head(self.backbone(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val/loss", F.cross_entropy(logits, labels), prog_bar=True)
        self._val_outputs.append((logits.argmax(dim=1).cpu(), labels.cpu()))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        preds, labels = (torch.cat(x) for x in zip(*self._val_outputs, strict=True))
        self._val_outputs.clear()
        for name, value in classification_metrics(labels, preds).items():
            self.log(f"val/{name}", value, prog_bar=name == "accuracy")

    def _schedule(self, optimizer: torch.optim.Optimizer, warmup_fraction: float) -> dict:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(warmup_fraction * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _cosine_with_warmup(total, max(1, warmup))
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class LinearProbe(_Classifier):
    """Linear evaluation: a frozen backbone (kept in eval mode) and a trained linear head.

    The standard protocol of SimCLR (Chen et al. 2020) and DINO (Caron et al. 2021); unlike
    :func:`~scratchpath.finetune.linear_probe_eval` it sees augmented images every epoch.

    Args:
        backbone: an export folder or a module returning pooled ``(B, D)`` features.
        num_classes: number of classes.
        lr, weight_decay: AdamW settings of the head (cosine decay, 5% linear warm-up).
    """

    def __init__(
        self,
        backbone: str | Path | nn.Module,
        num_classes: int,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(backbone, num_classes)
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()  # frozen: batch-norm statistics and dropout stay in eval mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone(x)
        return self.head(features)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.head.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        return self._schedule(optimizer, warmup_fraction=0.05)


class FineTune(_Classifier):
    """Full fine-tuning with layer-wise learning-rate decay (LLRD).

    Layer ``l`` of ``L`` gets ``lr * layer_decay ** (L - l)`` (BEiT, Bao et al. 2022; used by
    MAE, He et al. 2022), computed by timm's ``param_groups_layer_decay`` from the backbone's
    ``group_matcher``; norms, biases and position embeddings get no weight decay. The head uses
    ``lr``. AdamW, linear warm-up then cosine decay, per step.

    Args:
        backbone: an export folder or a timm backbone module.
        num_classes: number of classes.
        lr: peak learning rate of the head and the last backbone layer.
        layer_decay: per-layer factor (1.0 = no decay; 0.65-0.75 is usual for ViTs).
        weight_decay: AdamW weight decay.
        warmup_fraction: share of the steps spent warming up linearly.
    """

    def __init__(
        self,
        backbone: str | Path | nn.Module,
        num_classes: int,
        lr: float = 1e-4,
        layer_decay: float = 0.75,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
    ) -> None:
        super().__init__(backbone, num_classes)
        self.save_hyperparameters(ignore=["backbone"])

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups: LLRD groups of the backbone (with ``lr`` already scaled) and
        the head at the full learning rate."""
        hp = self.hparams
        no_decay = getattr(self.backbone, "no_weight_decay", lambda: set())()
        groups = param_groups_layer_decay(
            self.backbone,
            weight_decay=hp.weight_decay,
            no_weight_decay_list=tuple(no_decay),
            layer_decay=hp.layer_decay,
        )
        for group in groups:
            group["lr"] = hp.lr * group.get("lr_scale", 1.0)
        groups.append({"params": list(self.head.parameters()), "lr": hp.lr, "lr_scale": 1.0})
        return groups

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.param_groups(), lr=hp.lr, weight_decay=hp.weight_decay)
        return self._schedule(optimizer, warmup_fraction=hp.warmup_fraction)
