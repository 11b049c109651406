"""What a DataLoader worker makes of a :class:`BatchRequest`: one store read, then the batch.

By the views' path (see :mod:`scratchpath.data.module`): seeded CPU views per tile, the tiles
themselves (lossless stores on the device path) or the JPEG bytes (:class:`EncodedTiles`). A
damaged tile never raises here: its slot gets another tile of the batch and the batch reports it
(``"damaged"``), for :class:`~scratchpath.data.decode.DamagedTiles` in the training process.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from scratchpath.data.decode import Damage, EncodedTiles, refill_slots
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
    seeded CPU views per tile, the tiles themselves or (JPEG stores) their encoded bytes.

    The seed of a tile's CPU views depends only on (seed, epoch, tile index), so batches are the
    same whatever the number of workers, ranks or the batch a tile lands in. Each DataLoader
    worker reads through its own file handles: a spawned worker gets the store pickled by path
    and reopens it, a forked one has the store drop the parent's handles on first use.
    """

    def __init__(self, store: PatchStore, views: ViewGenerator, seed: int) -> None:
        self.store = store
        self.views = views
        self.seed = seed

    def __getitem__(self, request: BatchRequest) -> dict[str, Any]:
        epoch, indices = request
        self.views.set_epoch(epoch)  # progressive resizing: the epoch picks the view size
        index = torch.as_tensor(indices, dtype=torch.int64)  # (B,)
        # A damaged tile's slot gets another tile of the batch (its index, and so its views'
        # seed, stays the planned one); "damaged" tells the training process (DamagedTiles).
        if self.views.device_augment and str(self.store.codec).startswith("jpeg"):
            blobs, damage = self._checked_blobs(indices)
            encoded = EncodedTiles.from_blobs(blobs, [int(i) for i in indices])
            return {"encoded": encoded, "index": index, **_reported(damage)}
        tiles, damage = self._read(indices)  # (B, H, W, 3) uint8
        if self.views.device_augment:
            return {"tiles": torch.from_numpy(tiles), "index": index, **_reported(damage)}
        per_view: list[list[torch.Tensor]] = [[] for _ in range(self.views.n_views)]
        for tile, tile_index in zip(tiles, indices, strict=True):
            self.views.set_seed(sample_seed(self.seed, epoch, int(tile_index)))
            for slot, view in zip(per_view, self.views(tile), strict=True):
                slot.append(view)
        return {"views": [torch.stack(views) for views in per_view], "index": index,
                **_reported(damage)}  # fmt: skip

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


class NamedDamage(Dataset):
    """Wraps a dataset whose reads may meet a damaged tile (µm fields): the worker reports the
    tile instead of raising, so that the training process stops with its one-line error."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, request: BatchRequest) -> dict[str, Any]:
        try:
            return self.dataset[request]
        except DamagedTileError as err:
            return {"damaged": [(err.tile, str(err))], "index": torch.zeros(0, dtype=torch.int64)}
