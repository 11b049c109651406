"""What a DataLoader worker makes of a :class:`BatchRequest`: one store read, then the batch.

By the views' path (see :mod:`scratchpath.data.module`): seeded CPU views per tile, the tiles
themselves (lossless stores on the device path) or the JPEG bytes (:class:`EncodedTiles`) with
the views' parameters, or the µm fields' views. A damaged tile never raises here: its slot gets
another tile of the batch and the batch reports it
(``"damaged"``), for :class:`~scratchpath.data.decode.DamagedTiles` in the training process.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from scratchpath.data.decode import Damage, EncodedTiles, refill_slots
from scratchpath.data.fields import FieldsOfView, FieldViewBatches
from scratchpath.data.sampling import BatchRequest, sample_seed
from scratchpath.errors import DamagedTileError
from scratchpath.store import PatchStore
from scratchpath.store.codecs import jpeg_damage
from scratchpath.views import ViewGenerator


def limit_worker_threads(worker_id: int) -> None:
    """``worker_init_fn``: one OpenCV and one torch thread per worker (the workers are the
    parallelism; more threads per worker only contend for the same cores).

    Forked workers already inherit one OpenCV thread from :meth:`PatchDataModule.train_dataloader`:
    ``cv2.setNumThreads`` in a forked child of a process whose OpenCV thread pool ran deadlocks
    (pthreads backend), so it is only called where the count is not 1 yet (spawned workers).
    """
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    torch.set_num_threads(1)


class ViewBatches(Dataset):
    """Maps a :class:`BatchRequest` to its host batch: one store read, then, by the views' path,
    seeded CPU views per tile, or the tiles themselves (JPEG stores: their encoded bytes) with
    the views' parameters; with µm ``fields``, :class:`FieldViewBatches`' views (plus the
    parameters of the device path's D4 and colour).

    The seed of a tile's views depends only on (seed, epoch, tile index), on both paths, so
    batches are the same whatever the number of workers, ranks or the batch a tile lands in,
    and both paths draw the same parameters for a tile. Each DataLoader worker reads through its
    own file handles: a spawned worker gets the store pickled by path and reopens it, a forked
    one has the store drop the parent's handles on first use.
    """

    def __init__(
        self, store: PatchStore, views: ViewGenerator, seed: int, fields: FieldsOfView | None = None
    ) -> None:
        self.store = store
        self.views = views
        self.seed = seed
        self.fields = None if fields is None else FieldViewBatches(store, fields, seed)

    def __getitem__(self, request: BatchRequest) -> dict[str, Any]:
        epoch, indices = request
        self.views.set_epoch(epoch)  # progressive resizing: the epoch picks the view size
        index = torch.as_tensor(indices, dtype=torch.int64)  # (B,)
        if self.fields is not None:  # µm fields cut the views; the device path adds D4, colour
            try:
                batch = self.fields[request]
            except DamagedTileError as err:  # named, not skipped: the training process stops
                empty = torch.zeros(0, dtype=torch.int64)
                return {"damaged": [(err.tile, str(err))], "index": empty}
            if self.views.device_augment:
                batch["view_params"] = self.view_params(epoch, indices)
            return batch
        # A damaged tile's slot gets another tile of the batch (its index, and so its views'
        # parameters, stays the planned one); "damaged" tells the training process.
        if self.views.device_augment:  # the tiles (or their bytes) and the views' parameters
            batch = {"view_params": self.view_params(epoch, indices), "index": index}
            if str(self.store.codec).startswith("jpeg"):
                blobs, damage = self._checked_blobs(indices)
                encoded = EncodedTiles.from_blobs(blobs, [int(i) for i in indices])
                return {**batch, "encoded": encoded, **_reported(damage)}
            tiles, damage = self._read(indices)  # (B, H, W, 3) uint8
            return {**batch, "tiles": torch.from_numpy(tiles), **_reported(damage)}
        tiles, damage = self._read(indices)
        per_view: list[list[torch.Tensor]] = [[] for _ in range(self.views.n_views)]
        for tile, tile_index in zip(tiles, indices, strict=True):
            self.views.set_seed(sample_seed(self.seed, epoch, int(tile_index)))
            for slot, view in zip(per_view, self.views(tile), strict=True):
                slot.append(view)
        return {"views": [torch.stack(views) for views in per_view], "index": index,
                **_reported(damage)}  # fmt: skip

    def view_params(self, epoch: int, indices: np.ndarray) -> torch.Tensor:
        """The device path's view parameters of a batch, (V, B, N_PARAMS) float32: the draw the
        CPU path makes per tile, from the same per-tile seeds (so both paths make the same
        views of a tile); pinned with the batch, it reaches the device without a sync."""
        rngs = [np.random.default_rng(sample_seed(self.seed, epoch, int(i))) for i in indices]
        side = self.store.tile_size
        return torch.from_numpy(self.views.draw_params(rngs, (side, side)))

    def _read(self, indices: Any) -> tuple[np.ndarray, Damage]:
        """The batch's decoded tiles; only after a failure, read again tile by tile to find
        every damaged one and refill its slot."""
        try:
            return self.store.read(indices), []
        except DamagedTileError:
            pass
        tiles = np.zeros((len(indices), self.store.tile_size, self.store.tile_size, 3), np.uint8)
        damage: Damage = []
        bad = [False] * len(indices)
        for j, i in enumerate(indices):
            try:
                tiles[j] = self.store.read([i])[0]
            except DamagedTileError as err:
                damage.append((err.tile, str(err)))
                bad[j] = True
        slots = refill_slots(bad)
        return (tiles if slots is None else tiles[slots]), damage

    def _checked_blobs(self, indices: Any) -> tuple[list[bytes], Damage]:
        """The batch's JPEG bytes, each checked by ``jpeg_damage`` (the reader's own check)."""
        blobs = self.store.read_encoded_batch(indices)
        size = self.store.tile_size
        reasons = [jpeg_damage(blob, size) for blob in blobs]
        if not any(reasons):
            return blobs, []
        damage = [(int(i), str(self.store.damaged_tile(int(i), reason)))
                  for i, reason in zip(indices, reasons, strict=True) if reason]  # fmt: skip
        slots = refill_slots([reason is not None for reason in reasons])
        return ([blobs[s] for s in slots] if slots is not None else blobs), damage


def _reported(damage: Damage) -> dict[str, Damage]:
    """The batch's ``"damaged"`` entry: only when a tile was damaged (batches stay as they were)."""
    return {"damaged": damage} if damage else {}
