"""Which tiles each rank reads in an epoch, and in which order: DDP-correct, seeded, resumable.

An epoch is planned on tile *indices* only (no pixels are touched), in four vectorised steps:

1. **pool** — tiles with ``tissue_fraction >= min_tissue`` (fixed for the run).
2. **slide balance** (``max_tiles_per_slide=K``) — per slide, a fresh random subset of at most
   ``K`` tiles each epoch, so that slides with many tiles do not dominate an epoch while all of
   their tiles are still seen over several epochs.
2b. **magnification weights** (``mpp_weights={0.25: 1, 0.5: 2, ...}``) — for stores cut at
   several µm/px: each epoch holds about ``w_m / sum(w) * n`` tiles of µm/px ``m`` (``n`` the
   tiles after step 2), a fresh random subset of that magnification's tiles (repeating them only
   when the weight asks for more than it has); tiles of a µm/px with no weight are not sampled.
   A tile's µm/px is matched to the nearest weighted one within 10 %.
3. **order**, by ``shuffle``:

   - ``"tile"``: one global random permutation. Best mixing (a batch draws from the whole
     store), at the price of one small random read per tile. With the store's one-tile-per-chunk
     layout that is cheap on a local disk or SSD, but latency-bound on object stores and network
     file systems.
   - ``"shard"``: the storage shards (``store.chunk_ids``) are visited in a random order, the
     tiles of one shard in storage order, and that stream is mixed by a shuffle buffer of
     ``shuffle_buffer`` tiles, filled and drained in blocks (block shuffle: a tile moves at most
     one buffer length). Each shard is read once and sequentially, which is what object stores
     and network file systems want; mixing is weaker: a batch holds tiles of only about
     ``shuffle_buffer / tiles_per_shard`` shards, so keep ``shuffle_buffer`` well above both the
     batch size and the shard size.
4. **split** — the epoch order is cut into ``world_size`` contiguous parts of
   ``n_batches * batch_size`` tiles (contiguous keeps shard locality per rank). With
   ``drop_last=True`` the at most ``world_size * batch_size - 1`` leftover tiles are skipped (a
   different random set each epoch); with ``drop_last=False`` the order is padded by repeating its
   first tiles. Either way every rank gets exactly the same number of *full* batches, so no rank
   ever waits in a collective for a batch that another rank does not have.

The plan depends only on (seed, epoch, world size, batch size, the store's tile table), so every
rank computes its own share with no communication, and a resumed run recomputes the same plan and
skips the batches it already consumed (:meth:`DistributedBatchSampler.resume`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import numpy as np
from torch.utils.data import DistributedSampler

from scratchpath.errors import ScratchpathError

ShuffleMode = Literal["tile", "shard"]

# Distinct streams of one (seed, epoch): the slide subset must not correlate with the order.
_STREAM_SLIDE_BALANCE = 1
_STREAM_ORDER = 2
_STREAM_MAGNIFICATION = 3
MPP_MATCH = 0.10  # relative distance within which a tile's µm/px counts as a weighted one


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


def tissue_pool(tissue_fraction: np.ndarray, min_tissue: float) -> np.ndarray:
    """Indices (int64, ascending) of the tiles with at least ``min_tissue`` tissue."""
    return np.flatnonzero(np.asarray(tissue_fraction) >= min_tissue).astype(np.int64)


def balance_slides(
    pool: np.ndarray, slide_key: np.ndarray, max_per_slide: int, rng: np.random.Generator
) -> np.ndarray:
    """A random subset of ``pool`` with at most ``max_per_slide`` tiles per slide (ascending)."""
    keys = slide_key[pool]
    order = np.lexsort((rng.random(len(pool)), keys))  # by slide, random within a slide
    sorted_keys = keys[order]
    slide_starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    run_length = np.diff(np.r_[slide_starts, len(pool)])
    rank_in_slide = np.arange(len(pool)) - np.repeat(slide_starts, run_length)
    return np.sort(pool[order[rank_in_slide < max_per_slide]])


def magnification_groups(
    tile_mpp: np.ndarray, mpp_weights: dict[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per tile, the index of its weighted µm/px in ``sorted(mpp_weights)`` (-1: none within
    :data:`MPP_MATCH`), and the normalised weights in that order."""
    keys = np.array(sorted(mpp_weights), np.float64)
    weights = np.array([mpp_weights[k] for k in sorted(mpp_weights)], np.float64)
    if len(keys) == 0 or (keys <= 0).any() or (weights < 0).any() or weights.sum() <= 0:
        raise ScratchpathError(
            f"mpp_weights: needs positive µm/px keys and non-negative weights with a positive "
            f"sum, got {mpp_weights}"
        )
    mpp = np.asarray(tile_mpp, np.float64)
    distance = np.abs(np.log(mpp[:, None] / keys[None, :]))  # (tiles, keys), scale-free
    group = distance.argmin(axis=1)
    group[distance[np.arange(len(mpp)), group] > np.log1p(MPP_MATCH)] = -1
    return group.astype(np.int64), weights / weights.sum()


def weight_magnifications(
    tiles: np.ndarray, group: np.ndarray, weights: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``tiles`` resampled so that magnification ``k`` makes up ``weights[k]`` of them (sorted).

    The epoch keeps ``len(tiles)`` tiles; counts are rounded by largest remainder. Each group
    contributes a random subset (or, when asked for more tiles than it has, whole random
    permutations of it and then a subset), so no tile repeats unless it must.
    """
    tiles = np.asarray(tiles, np.int64)
    groups = group[tiles]
    present = np.array([(groups == k).any() for k in range(len(weights))])
    w = np.where(present, weights, 0.0)
    if w.sum() == 0:
        return tiles[:0]
    quota = w / w.sum() * len(tiles)
    counts = np.floor(quota).astype(np.int64)
    counts[np.argsort(-(quota - counts), kind="stable")[: len(tiles) - counts.sum()]] += 1
    chosen = []
    for k, count in enumerate(counts):
        members = tiles[groups == k]
        if count == 0 or len(members) == 0:
            continue
        repeats = -(-int(count) // len(members))
        drawn = np.concatenate([rng.permutation(members) for _ in range(repeats)])
        chosen.append(drawn[:count])
    return np.sort(np.concatenate(chosen)) if chosen else tiles[:0]


def shard_order(
    tiles: np.ndarray, chunk_ids: np.ndarray, buffer: int, rng: np.random.Generator
) -> np.ndarray:
    """Shards in random order, tiles of a shard in storage order, block-shuffled by ``buffer``."""
    shards = chunk_ids[tiles]
    unique_shards, shard_of_tile = np.unique(shards, return_inverse=True)
    shard_rank = rng.permutation(len(unique_shards))[shard_of_tile]
    stream = tiles[np.lexsort((tiles, shard_rank))]  # (n,) shard by shard
    block = np.arange(len(stream)) // max(buffer, 1)
    return stream[np.lexsort((rng.random(len(stream)), block))]


def split_batches(
    order: np.ndarray, *, rank: int, world_size: int, batch_size: int, drop_last: bool
) -> np.ndarray:
    """This rank's share of the epoch ``order`` as ``(n_batches, batch_size)`` full batches."""
    per_step = world_size * batch_size
    n_batches = len(order) // per_step if drop_last else -(-len(order) // per_step)
    if not drop_last and len(order) > 0:
        order = np.resize(order, n_batches * per_step)  # pads by repeating the first tiles
    share = n_batches * batch_size
    return order[rank * share : (rank + 1) * share].reshape(n_batches, batch_size)


class DistributedBatchSampler(DistributedSampler):
    """Yields this rank's :class:`BatchRequest` s of one epoch, as planned in the module docstring.

    Used as the ``sampler`` of a ``DataLoader(batch_size=None)`` whose dataset reads a whole batch
    per request (one ``store.read`` per batch). It subclasses ``DistributedSampler`` (without its
    ``__init__``, which plans over single items) only so that Lightning recognises it as already
    rank-aware and neither wraps nor replaces it; Lightning still calls :meth:`set_epoch`.

    Args:
        slide_key: per tile, an id of its slide (unique across concatenated stores).
        tissue_fraction: per tile, the tissue fraction recorded at tiling.
        chunk_ids: per tile, the storage shard holding it (``PatchStore.chunk_ids``).
        batch_size: tiles per batch on this rank.
        rank, world_size: this process and the number of processes.
        seed: base seed; the plan of an epoch depends on (seed, epoch) only.
        shuffle: ``"tile"`` or ``"shard"``; see the module docstring for the trade-off.
        shuffle_buffer: tiles mixed together in ``"shard"`` mode.
        max_tiles_per_slide: at most this many tiles per slide per epoch (None: all).
        tile_mpp: per tile, its µm/px (needed with ``mpp_weights``).
        mpp_weights: ``{µm/px: weight}``: the share of each magnification in an epoch, for
            stores cut at several µm/px (None: every tile once, whatever its µm/px).
        min_tissue: tiles with a smaller tissue fraction are never sampled.
        drop_last: drop the tiles that do not fill a step of all ranks (True) or pad by repeating.
    """

    def __init__(
        self,
        *,
        slide_key: np.ndarray,
        tissue_fraction: np.ndarray,
        chunk_ids: np.ndarray,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: ShuffleMode = "tile",
        shuffle_buffer: int = 4096,
        max_tiles_per_slide: int | None = None,
        min_tissue: float = 0.0,
        drop_last: bool = True,
        tile_mpp: np.ndarray | None = None,
        mpp_weights: dict[float, float] | None = None,
    ) -> None:
        _check_arguments(batch_size, rank, world_size, shuffle, shuffle_buffer, max_tiles_per_slide)
        self.slide_key = np.asarray(slide_key)
        self.chunk_ids = np.asarray(chunk_ids)
        self.pool = tissue_pool(tissue_fraction, min_tissue)
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
        self._magnification = None
        if mpp_weights is not None:
            if tile_mpp is None:
                raise ScratchpathError("mpp_weights: needs the µm/px of every tile (tile_mpp)")
            self._magnification = magnification_groups(tile_mpp, mpp_weights)
        self._resume_at: tuple[int, int] | None = None
        self._cached: tuple[int, np.ndarray] | None = None
        self.tiles_per_epoch = len(self._epoch_tiles(0))
        self.num_samples = len(self) * batch_size
        self.total_size = self.num_samples * world_size

    @classmethod
    def from_store(cls, store: Any, **kwargs: Any) -> DistributedBatchSampler:
        """Plan over a :class:`~scratchpath.store.PatchStore` (or anything with its tile table)."""
        if kwargs.get("mpp_weights") is not None:  # the µm/px column only when it is used
            kwargs.setdefault("tile_mpp", store.tiles["mpp"])
        return cls(
            slide_key=store.tiles["slide_index"],
            tissue_fraction=store.tiles["tissue_fraction"],
            chunk_ids=store.chunk_ids,
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

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global tile order of ``epoch`` (all ranks, before the split)."""
        tiles = self._epoch_tiles(epoch)
        rng = _epoch_rng(self.seed, epoch, _STREAM_ORDER)
        if self.shuffle_mode == "tile":
            return rng.permutation(tiles)
        return shard_order(tiles, self.chunk_ids, self.shuffle_buffer, rng)

    def batches(self, epoch: int) -> np.ndarray:
        """This rank's ``(len(self), batch_size)`` tile indices of ``epoch``."""
        if self._cached is None or self._cached[0] != epoch:
            order = self.epoch_order(epoch)
            split = split_batches(
                order,
                rank=self.rank,
                world_size=self.num_replicas,
                batch_size=self.batch_size,
                drop_last=self.drop_last,
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
        for indices in self.batches(epoch)[start:]:
            yield BatchRequest(epoch, indices)

    def _epoch_tiles(self, epoch: int) -> np.ndarray:
        tiles = self.pool
        if self.max_tiles_per_slide is not None:
            rng = _epoch_rng(self.seed, epoch, _STREAM_SLIDE_BALANCE)
            tiles = balance_slides(tiles, self.slide_key, self.max_tiles_per_slide, rng)
        if self._magnification is not None:
            rng = _epoch_rng(self.seed, epoch, _STREAM_MAGNIFICATION)
            tiles = weight_magnifications(tiles, *self._magnification, rng)
        return tiles


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
