"""``FieldViewBatches``: a batch request of anchor tiles -> its µm-continuous views."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from scratchpath.data.fields.config import FieldsOfView
from scratchpath.data.fields.crop import crop_fields
from scratchpath.data.fields.index import MagnificationIndex
from scratchpath.data.fields.plan import FieldPlan, plan_fields
from scratchpath.data.sampling import BatchRequest, sample_seed

_STREAM_FIELDS = 2  # sample_seed stream of the field-of-view plan (0, 1: CPU / device views)


class FieldViewBatches(Dataset):
    """Maps a :class:`BatchRequest` of anchor tiles to µm-continuous views (package doc).

    Returns ``{"views": [uint8 (B, 3, s, s)] * V, "view_mpp": float32 (V, B), "index"}``, or with
    ``fields.on_device`` the source tiles and windows (``"field_tiles"``, ``"field_source"``,
    ``"field_boxes"``) that :func:`crop_fields` turns into the views on the device.

    The magnification index is built (or found in the node-local cache) when the dataset is
    made, in the training process; DataLoader workers receive it by cache folder and map it.
    """

    def __init__(self, store: Any, fields: FieldsOfView, seed: int) -> None:
        self.store = store
        self.fields = fields
        self.seed = seed
        self.index = MagnificationIndex(store)

    def plan(self, request: BatchRequest) -> FieldPlan:
        epoch, anchors = request
        rngs = [np.random.default_rng(sample_seed(self.seed, epoch, int(a), _STREAM_FIELDS))
                for a in anchors]  # fmt: skip
        return plan_fields(self.index, self.fields, anchors, rngs)

    def __getitem__(self, request: BatchRequest) -> dict[str, Any]:
        plan = self.plan(request)
        unique, inverse = np.unique(plan.source, return_inverse=True)
        tiles = torch.from_numpy(self.store.read(unique)).permute(0, 3, 1, 2).contiguous()
        tile_of_view = torch.from_numpy(inverse.reshape(plan.source.shape).astype(np.int64))
        boxes = torch.from_numpy(plan.boxes.astype(np.float32))
        batch = {
            "view_mpp": torch.from_numpy(plan.view_mpp.astype(np.float32)),  # (V, B)
            "index": torch.as_tensor(request[1], dtype=torch.int64),
        }
        if self.fields.on_device:
            return {**batch, "field_tiles": tiles, "field_source": tile_of_view,
                    "field_boxes": boxes}  # fmt: skip
        return {**batch, "views": crop_fields(tiles, tile_of_view, boxes, plan.sizes)}
