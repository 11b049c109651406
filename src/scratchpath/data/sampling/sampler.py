"""``DistributedBatchSampler``: this rank's batches of each epoch (plan in the package doc)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import numpy as np
from torch.utils.data import DistributedSampler

from scratchpath.data.sampling.epoch import EpochTiles, plan_epoch
from scratchpath.data.sampling.order import ShardStream, tile_order
from scratchpath.data.sampling.units import (
    PassingTiles,
    change_points,
    magnification_keys,
    tile_units,
)
from scratchpath.errors import ScratchpathError

ShuffleMode = Literal["tile", "shard"]

# Distinct streams of one (seed, epoch): the slide subset must not correlate with the order.
_STREAM_SLIDE_BALANCE = 1
_STREAM_ORDER = 2
_STREAM_MAGNIFICATION = 3
_STREAM_SUBSET = 4


class BatchRequest(NamedTuple):
    """One planned batch: the tile indices of the store, and the epoch (it seeds the views)."""

    epoch: int
    indices: np.ndarray  # (B,) int64


def sample_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """Augmentation seed of one tile in one epoch: independent of rank, worker and batch.

    ``stream`` separates uses of one (seed, epoch, tile): 0 for the CPU views of the tile, 1 for
    the device-side augmentation of the batch that the tile opens.
    """
    entropy = [seed, epoch, int(index), stream]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


class EpochPlan:
    """The order of one epoch as a function: ``plan(positions)`` -> tile indices."""

    def __init__(self, n: int, order: Callable[[np.ndarray], np.ndarray]) -> None:
        self.n = n
        self._order = order

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        return self._order(np.asarray(positions, np.int64))


class DistributedBatchSampler(DistributedSampler):
    """Yields this rank's :class:`BatchRequest` s of one epoch, as planned in the package doc.

    Used as the ``sampler`` of a ``DataLoader(batch_size=None)`` whose dataset reads a whole batch
    per request (one ``store.read`` per batch). It subclasses ``DistributedSampler`` (without its
    ``__init__``, which plans over single items) only so that Lightning recognises it as already
    rank-aware and neither wraps nor replaces it; Lightning still calls :meth:`set_epoch`.

    Set-up reads the per-tile columns once, in chunks (the tissue fraction when ``min_tissue``
    is set, the µm/px with ``mpp_weights``), and keeps O(slides + shards) per rank: units of
    tiles and a 1-bit tissue filter (:mod:`~scratchpath.data.sampling.units`). Each epoch's
    plan is O(units); each batch O(batch_size).

    Args:
        slide_key: per tile, an id of its slide (unique across concatenated stores).
        tissue_fraction: per tile, the tissue fraction recorded at tiling.
        chunk_ids: per tile, the storage shard holding it (shard mode only, non-decreasing
            along the table), for tables that do not give ``shard_starts``.
        batch_size: tiles per batch on this rank.
        rank, world_size: this process and the number of processes.
        seed: base seed; the plan of an epoch depends on (seed, epoch) only.
        shuffle: ``"tile"`` or ``"shard"``; see the package doc for the trade-off.
        shuffle_buffer: tiles mixed together in ``"shard"`` mode.
        max_tiles_per_slide: at most this many tiles per slide per epoch (None: all).
        min_tissue: tiles with a smaller tissue fraction are never sampled.
        drop_last: drop the tiles that do not fill a step of all ranks (True) or pad by repeating.
        shard_starts: the first tile index of each shard (``PatchStore.shard_starts()``).
        tile_mpp: per tile, its µm/px (needed with ``mpp_weights``).
        mpp_weights: ``{µm/px: weight}``: the share of each magnification in an epoch, for
            stores cut at several µm/px (None: every tile once, whatever its µm/px).
        slide_starts: the first tile index of each slide (``PatchStore.slide_starts()``);
            without it slide runs are found by scanning ``slide_key``.
    """

    def __init__(
        self,
        *,
        slide_key: np.ndarray,
        tissue_fraction: np.ndarray,
        chunk_ids: np.ndarray | None = None,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: ShuffleMode = "tile",
        shuffle_buffer: int = 65536,
        max_tiles_per_slide: int | None = None,
        min_tissue: float = 0.0,
        drop_last: bool = True,
        shard_starts: np.ndarray | None = None,
        tile_mpp: np.ndarray | None = None,
        mpp_weights: dict[float, float] | None = None,
        slide_starts: np.ndarray | None = None,
    ) -> None:
        _check_arguments(batch_size, rank, world_size, shuffle, shuffle_buffer, max_tiles_per_slide)
        n = len(tissue_fraction)
        passing = PassingTiles(tissue_fraction, min_tissue)
        self._passing = None if passing.count == n else passing  # all pass: no filter at all
        del passing
        self._weights = None
        mpp_keys = None
        if mpp_weights is not None:
            if tile_mpp is None:
                raise ScratchpathError("mpp_weights: needs the µm/px of every tile (tile_mpp)")
            mpp_keys, self._weights = magnification_keys(mpp_weights)
        if shard_starts is None and chunk_ids is not None:
            shard_starts = np.r_[0, change_points(_contiguous(chunk_ids))] if n else None
        if shuffle == "shard" and shard_starts is None:
            raise ScratchpathError("chunk_ids: shard mode needs the shard of every tile")
        self._units = tile_units(
            n,
            slide_key=slide_key,
            slide_starts=slide_starts,
            shard_starts=shard_starts,
            tile_mpp=tile_mpp,
            mpp_keys=mpp_keys,
            passing=self._passing,
        )
        self.batch_size = batch_size
        # The attribute names of torch's DistributedSampler, for code that inspects samplers.
        self.num_replicas = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.shuffle = True
        self.drop_last = drop_last
        self.shuffle_mode: ShuffleMode = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.max_tiles_per_slide = max_tiles_per_slide
        self._resume_at: tuple[int, int] | None = None
        self._cached: tuple[int, np.ndarray] | None = None
        self._plan: tuple[int, EpochPlan] | None = None
        self.tiles_per_epoch = self.epoch_tiles(0).n
        self.num_samples = len(self) * batch_size
        self.total_size = self.num_samples * world_size

    @classmethod
    def from_store(cls, store: Any, **kwargs: Any) -> DistributedBatchSampler:
        """Plan over a :class:`~scratchpath.store.PatchStore` (or anything with its tile table:
        ``tiles`` columns, and ``chunk_ids`` for shard mode when it has no ``shard_starts``)."""
        if kwargs.get("mpp_weights") is not None:  # the µm/px column only when it is used
            kwargs.setdefault("tile_mpp", store.tiles["mpp"])
        known = {}
        if hasattr(store, "shard_starts"):
            known["shard_starts"] = store.shard_starts()  # O(shards)
        elif kwargs.get("shuffle", "tile") == "shard":
            known["chunk_ids"] = store.chunk_ids
        if hasattr(store, "slide_starts"):
            known["slide_starts"] = store.slide_starts()  # O(slides)
        return cls(
            slide_key=store.tiles["slide_index"],
            tissue_fraction=store.tiles["tissue_fraction"],
            **known,
            **kwargs,
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan the next iteration yields (Lightning calls this)."""
        self.epoch = int(epoch)

    def resume(self, epoch: int, batches_consumed: int) -> None:
        """Make the next iteration over ``epoch`` start after its first ``batches_consumed``."""
        self._resume_at = (int(epoch), int(batches_consumed))

    def __len__(self) -> int:
        """Batches per epoch on every rank (constant across epochs and ranks)."""
        per_step = self.num_replicas * self.batch_size
        if self.drop_last:
            return self.tiles_per_epoch // per_step
        return -(-self.tiles_per_epoch // per_step)

    def epoch_tiles(self, epoch: int) -> EpochTiles:
        """The tiles of ``epoch`` (steps 1-2b) as a function of position, O(units)."""
        return plan_epoch(
            self._units,
            self._passing,
            max_per_slide=self.max_tiles_per_slide,
            weights=self._weights,
            rng_cap=_epoch_rng(self.seed, epoch, _STREAM_SLIDE_BALANCE),
            rng_weights=_epoch_rng(self.seed, epoch, _STREAM_MAGNIFICATION),
            rng_keys=_epoch_rng(self.seed, epoch, _STREAM_SUBSET),
        )

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's order as a function of position (built once per epoch: O(units), plus
        O(tiles / 4096) in tile mode)."""
        if self._plan is None or self._plan[0] != epoch:
            tiles = self.epoch_tiles(epoch)
            rng = _epoch_rng(self.seed, epoch, _STREAM_ORDER)
            if self.shuffle_mode == "shard":
                block_seed = [self.seed, epoch, _STREAM_ORDER]
                order = ShardStream(tiles, self.shuffle_buffer, rng, block_seed)
            else:
                order = tile_order(tiles, rng)
            self._plan = (epoch, EpochPlan(tiles.n, order))
        return self._plan[1]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global tile order of ``epoch`` (all ranks, before the split), materialised."""
        plan = self.plan(epoch)
        return plan(np.arange(plan.n))

    def batch(self, epoch: int, i: int) -> np.ndarray:
        """Batch ``i`` of this rank in ``epoch``: (batch_size,) tile indices, O(batch_size)."""
        plan = self.plan(epoch)
        share = len(self) * self.batch_size
        first = self.rank * share + i * self.batch_size
        positions = np.arange(first, first + self.batch_size, dtype=np.int64)
        if not self.drop_last:
            positions %= max(plan.n, 1)  # padding repeats the first tiles of the order
        return plan(positions)

    def batches(self, epoch: int) -> np.ndarray:
        """This rank's ``(len(self), batch_size)`` tile indices of ``epoch``."""
        if self._cached is None or self._cached[0] != epoch:
            n_batches = len(self)
            split = (
                np.stack([self.batch(epoch, i) for i in range(n_batches)])
                if n_batches
                else (np.zeros((0, self.batch_size), np.int64))
            )
            self._cached = (epoch, split)
        return self._cached[1]

    def __iter__(self) -> Iterator[BatchRequest]:
        # A generator: the epoch is read at the first next(), after Lightning's set_epoch.
        epoch = self.epoch
        start = 0
        if self._resume_at is not None:
            resume_epoch, consumed = self._resume_at
            self._resume_at = None  # one-shot: later epochs start from their beginning
            if resume_epoch == epoch:
                start = consumed
        for i in range(start, len(self)):
            yield BatchRequest(epoch, self.batch(epoch, i))


def _contiguous(chunk_ids: np.ndarray) -> np.ndarray:
    chunk_ids = np.asarray(chunk_ids)
    if len(chunk_ids) > 1 and not (chunk_ids[1:] >= chunk_ids[:-1]).all():
        raise ScratchpathError("chunk_ids: shard mode needs each shard's tiles contiguous")
    return chunk_ids


def _check_arguments(
    batch_size: int,
    rank: int,
    world_size: int,
    shuffle: str,
    shuffle_buffer: int,
    max_tiles_per_slide: int | None,
) -> None:
    if batch_size < 1:
        raise ScratchpathError(f"batch_size: must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ScratchpathError(f"rank: {rank} is not in [0, world_size={world_size})")
    if shuffle not in ("tile", "shard"):
        raise ScratchpathError(f"shuffle: must be 'tile' or 'shard', got {shuffle!r}")
    if shuffle_buffer < 1:
        raise ScratchpathError(f"shuffle_buffer: must be at least 1, got {shuffle_buffer}")
    if max_tiles_per_slide is not None and max_tiles_per_slide < 1:
        raise ScratchpathError(
            f"max_tiles_per_slide: must be at least 1 or null, got {max_tiles_per_slide}"
        )
