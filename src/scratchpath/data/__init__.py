"""Training data: :class:`PatchDataModule` and its DDP-correct, resumable batch sampler."""

from __future__ import annotations

from scratchpath.data.fields import FieldsOfView, FieldViewBatches
from scratchpath.data.module import PatchDataModule, ViewBatches
from scratchpath.data.sampling import BatchRequest, DistributedBatchSampler, sample_seed

__all__ = [
    "BatchRequest",
    "DistributedBatchSampler",
    "FieldViewBatches",
    "FieldsOfView",
    "PatchDataModule",
    "ViewBatches",
    "sample_seed",
]
