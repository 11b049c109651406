"""A callback the multi-process tests add to ``scratchpath fit`` from the command line
(``--trainer.callbacks='[{"class_path": "rank_probe.RecordRank", ...}]'``, with ``tests/`` on
PYTHONPATH): each rank writes the tiles it trained on and its final weights (parameters) to
``<out>/rank<global rank>.pt``, which only rank 0's checkpoint would not show."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch


class RecordRank(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.tiles: list[int] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        self.tiles.extend(int(i) for i in batch["index"].tolist())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        # Parameters only: BatchNorm running statistics are each rank's own (DDP broadcasts
        # rank 0's before every forward, which then updates them from the rank's batch).
        weights = {k: v.detach().cpu().clone() for k, v in pl_module.named_parameters()}
        record = {
            "tiles": self.tiles,
            "weights": weights,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
        }
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")
