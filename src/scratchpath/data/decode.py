"""The device path's JPEG decode, and what a damaged tile does to a run (both paths).

Decode: a batch's JPEG bytes travel as one pinned buffer (:class:`EncodedTiles`) and are decoded
where training runs by TorchCodec's ``decode_jpeg`` (nvJPEG on CUDA, libjpeg-turbo on the CPU:
the same pixels as the store's own decoder). On CUDA the decode runs on a side stream of its own
(:func:`decode_on_device`), because nvJPEG's hardware engine does not honour stream order
(pytorch/vision#9606, meta-pytorch/torchcodec#1634): with its outputs allocated on the training
stream, it could be handed memory that kernels still queued on that stream are about to read,
and overwrite it. Allocated on the side stream, the outputs come from memory that no training
kernel can still be using (the caching allocator keeps each stream's freed blocks apart, and
``record_stream`` holds a block until the training stream's uses of it are done). TorchCodec
>= 0.17 also waits on the host for the decode stream before the hardware writes (#1634): on
the side stream that waits for the decode only, never for the queued training step, so the
host keeps running ahead of the GPU. ``tests/test_cuda.py`` reproduces the #9606 race.

Damaged tiles: the CPU path's reader and the device path's workers check every JPEG with
:func:`scratchpath.store.codecs.jpeg_damage` (empty, truncated, corrupt entropy data, wrong
size) before a decoder sees it, and a batch that a decoder still rejects is decoded again one
tile at a time to find the culprit (only after a failure: the batched call stays the fast path).
Either way the tile is named by :meth:`~scratchpath.store.PatchStore.damaged_tile` (store,
shard, row, tile index, reason). Workers never raise for a damaged tile: they put another tile
of the same batch in its slot (:func:`refill_slots`) and report it in the batch
(``batch["damaged"]``), and :class:`DamagedTiles` in the training process decides: stop with
that one line (the default), or, with ``skip_bad_tiles``, count it, log it once and stop only
when more than ``max_bad_fraction`` of an epoch's tiles were damaged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from scratchpath.errors import DamagedTileError, ScratchpathError

log = logging.getLogger(__name__)

# (tile index, one-line message) per damaged slot of a batch: what a worker reports.
Damage = list[tuple[int, str]]


class EncodedTiles:
    """The encoded bytes of a batch of tiles: one flat uint8 tensor, each tile's length and
    its tile index (to name a tile that fails to decode).

    One buffer pins and copies cheaply. It is deliberately not a tensor, a sequence or a
    dataclass, so Lightning's batch transfer leaves it on the host: ``decode_jpeg`` wants its
    input in host memory and writes the decoded pixels on the device itself.
    """

    def __init__(
        self, data: torch.Tensor, sizes: tuple[int, ...], tiles: tuple[int, ...] = ()
    ) -> None:
        self.data, self.sizes = data, sizes
        self.tiles = tiles or tuple(range(len(sizes)))

    @classmethod
    def from_blobs(cls, blobs: Sequence[bytes], tiles: Sequence[int] = ()) -> EncodedTiles:
        sizes = tuple(len(blob) for blob in blobs)
        data = torch.empty(sum(sizes), dtype=torch.uint8)
        flat, start = data.numpy(), 0
        for blob, size in zip(blobs, sizes, strict=True):
            flat[start : start + size] = np.frombuffer(blob, np.uint8)
            start += size
        return cls(data, sizes, tuple(int(t) for t in tiles))

    def pin_memory(self, device: Any = None) -> EncodedTiles:
        """Called by the DataLoader's pinning thread."""
        return EncodedTiles(self.data.pin_memory(), self.sizes, self.tiles)

    def parts(self) -> list[torch.Tensor]:
        """Each tile's bytes, as views of the flat buffer (no copy)."""
        return list(torch.split(self.data, self.sizes))

    def decode(self, device: torch.device | str) -> torch.Tensor:
        """(B, 3, H, W) uint8 RGB tiles on ``device``, decoded there in one batched call."""
        return decode_on_device(self.parts(), torch.device(device))

    def __len__(self) -> int:
        return len(self.sizes)


_side_streams: dict[int, torch.cuda.Stream] = {}


def decode_on_device(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Decode the JPEGs ``parts`` (host uint8 tensors) into (B, 3, H, W) uint8 on ``device``.

    On CUDA: on this device's decode stream (see the module docstring for why), then the
    current stream waits for it and records its use of the outputs. No host sync of the
    current stream; TorchCodec waits on the host for the decode stream's own work.
    """
    from torchcodec.decoders import decode_jpeg

    if device.type != "cuda":
        return torch.stack(decode_jpeg(parts, mode="RGB", device=device))
    index = device.index if device.index is not None else torch.cuda.current_device()
    side = _side_streams.get(index)
    if side is None:
        side = _side_streams[index] = torch.cuda.Stream(device=index)
    current = torch.cuda.current_stream(index)
    with torch.cuda.stream(side):
        tiles = decode_jpeg(parts, mode="RGB", device=device)
    current.wait_stream(side)
    for tile in tiles:  # freed only once the current stream's uses of them are done
        tile.record_stream(current)
    return torch.stack(tiles)  # on the current stream


def decode_or_name(
    encoded: EncodedTiles,
    device: torch.device,
    name: Callable[[int, str], DamagedTileError],
) -> tuple[torch.Tensor, Damage]:
    """Decode a batch; if the batched call fails, decode it one tile at a time to find the
    tiles that fail, name each (``name(tile index, reason)``) and refill their slots."""
    try:
        return encoded.decode(device), []
    except RuntimeError as err:
        batch_error = err
    decoded: list[torch.Tensor | None] = []
    damage: Damage = []
    for tile, part in zip(encoded.tiles, encoded.parts(), strict=True):
        try:
            decoded.append(decode_on_device([part], device)[0])
        except RuntimeError as err:
            decoded.append(None)
            damage.append((tile, str(name(tile, decoder_reason(err)))))
    if not damage:  # no single tile fails: not a damaged tile, so not ours to hide
        raise batch_error
    slots = refill_slots([t is None for t in decoded])
    if slots is None:
        return torch.zeros(0), damage  # every tile damaged: DamagedTiles stops the run
    return torch.stack([decoded[s] for s in slots]), damage  # type: ignore[misc]


def decoder_reason(err: Exception) -> str:
    """A decoder's error as one line, without the C++ source location TorchCodec puts first
    (``"decode_rows, /.../DecodeJpeg.cpp:208, Bogus Huffman table definition"``)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: " + re.sub(r"^.*?\.(?:cpp|h):\d+,\s*", "", text)


def refill_slots(bad: Sequence[bool]) -> list[int] | None:
    """For each slot of a batch, the slot whose tile fills it: itself when good, else the
    good slots in turn (deterministic). None when no slot is good."""
    good = [j for j, is_bad in enumerate(bad) if not is_bad]
    if not good:
        return None
    order, k = [], 0
    for j, is_bad in enumerate(bad):
        if is_bad:
            order.append(good[k % len(good)])
            k += 1
        else:
            order.append(j)
    return order


class DamagedTiles:
    """The training process's bookkeeping of damaged tiles (one per data module and rank).

    Args:
        skip: False (default): the first damaged tile stops the run with its one-line error.
            True: each damaged tile is logged once and counted; its slot holds another tile
            of the same batch.
        max_fraction: with ``skip``, the run stops once more distinct damaged tiles than this
            fraction of the tiles one rank reads per epoch have been met.
        tiles_per_epoch: tiles one rank reads per epoch.
    """

    def __init__(self, skip: bool, max_fraction: float, tiles_per_epoch: int) -> None:
        self.skip, self.max_fraction = skip, max_fraction
        self.limit = max_fraction * tiles_per_epoch
        self.tiles_per_epoch = tiles_per_epoch
        self.seen: set[int] = set()

    def report(self, damage: Damage, batch_size: int) -> None:
        """Account for a batch's damaged tiles; raises :class:`ScratchpathError` to stop."""
        if not damage:
            return
        if not self.skip:
            raise ScratchpathError(
                f"{damage[0][1]} (data.skip_bad_tiles: true replaces damaged tiles instead)"
            )
        for tile, message in damage:
            if tile not in self.seen:
                self.seen.add(tile)
                log.warning("skipped a damaged tile (%d so far): %s", len(self.seen), message)
        if len(damage) >= batch_size:  # one entry per damaged slot
            raise ScratchpathError(f"every tile of a batch of {batch_size} is damaged: "
                                   f"{damage[0][1]}")  # fmt: skip
        if len(self.seen) > self.limit:
            raise ScratchpathError(
                f"{len(self.seen)} damaged tiles met, more than data.max_bad_fraction "
                f"{self.max_fraction:g} of the {self.tiles_per_epoch} tiles per epoch "
                f"(the last: {damage[-1][1]})"
            )
