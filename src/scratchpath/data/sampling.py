"""Which tiles each rank reads in an epoch, and in which order: DDP-correct, seeded, resumable.

An epoch is planned on tile *indices* only (no pixels are touched), in four steps:

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

   - ``"tile"``: a random permutation of the epoch's tiles. Best mixing (a batch draws from the
     whole store), at the price of one small random read per tile. With the store's
     one-tile-per-chunk layout that is cheap on a local disk or SSD, but latency-bound on object
     stores and network file systems. Up to ``EXACT_SHUFFLE_TILES`` tiles it is a uniform
     permutation; above, a *blocked* permutation that never materialises (see
     :class:`_BlockedPermutation`): consecutive positions visit randomly ordered blocks of
     ~``PERMUTATION_BLOCK`` tiles (a fresh block order per row of the layout), each block in its
     own random affine order, so a batch holds tiles of ``batch_size`` different blocks spread
     over the whole store. A uniform shuffle of 10^8 indices costs ~20 s of one core; this costs
     O(n / block) per epoch plus O(1) per planned tile.
   - ``"shard"``: the storage shards (``store.chunk_ids``) are visited in a random order, the
     tiles of one shard in storage order, and that stream is mixed by a shuffle buffer of
     ``shuffle_buffer`` tiles, filled and drained in blocks (block shuffle: a tile moves at most
     one buffer length; each block is a uniform permutation drawn from its own seed). Each shard
     is read once and sequentially, which is what object stores and network file systems want;
     mixing is weaker: a batch holds tiles of only about ``shuffle_buffer / tiles_per_shard``
     shards, so keep ``shuffle_buffer`` well above both the batch size and the shard size.
     Planning costs O(shards) per epoch (a permutation of the shards and a cumulative sum).
4. **split** — the epoch order is cut into ``world_size`` contiguous parts of
   ``n_batches * batch_size`` tiles (contiguous keeps shard locality per rank). With
   ``drop_last=True`` the at most ``world_size * batch_size - 1`` leftover tiles are skipped (a
   different random set each epoch); with ``drop_last=False`` the order is padded by repeating its
   first tiles. Either way every rank gets exactly the same number of *full* batches, so no rank
   ever waits in a collective for a batch that another rank does not have.

The order is a *function* from epoch position to tile index, evaluated batch by batch as the
loader asks: no rank ever holds the 10^8-entry order of an epoch, and skipping consumed batches on
resume costs nothing. The plan depends only on (seed, epoch, world size, batch size, the store's
tile table), so every rank computes its own share with no communication, and a resumed run
recomputes the same plan and skips the batches it already consumed
(:meth:`DistributedBatchSampler.resume`).
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


# Pools up to this size are shuffled with a uniform permutation (~0.1 s); larger ones with a
# blocked permutation that is never materialised.
EXACT_SHUFFLE_TILES = 1 << 22
PERMUTATION_BLOCK = 4096


class AllTiles:
    """The pool when every tile passes ``min_tissue``: indexing it gives the index itself, so
    a 10^8-tile run holds no 800 MB ``arange`` in every rank."""

    def __init__(self, n: int) -> None:
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index)
        return np.flatnonzero(index) if index.dtype == bool else index.astype(np.int64)


class SlideRuns(NamedTuple):
    """The pool grouped by slide: ``pool[order[starts[k]:starts[k] + lengths[k]]]`` is slide k.

    ``order`` is None when the pool is already grouped (tiles of a slide contiguous, the
    store's layout), which spares a sort of all tiles.
    """

    order: np.ndarray | None
    starts: np.ndarray
    lengths: np.ndarray


def slide_runs(pool: np.ndarray, slide_key: np.ndarray) -> SlideRuns:
    """Group the pool by slide once per run (O(n); a sort only if slides are not contiguous)."""
    keys = np.asarray(slide_key) if isinstance(pool, AllTiles) else np.asarray(slide_key)[pool]
    order = None
    if len(keys) > 1 and not (keys[1:] >= keys[:-1]).all():
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, int)
    lengths = np.diff(np.r_[starts, len(keys)])
    return SlideRuns(order, starts.astype(np.int64), lengths.astype(np.int64))


def balance_slides(
    pool: np.ndarray, runs: SlideRuns, max_per_slide: int, rng: np.random.Generator
) -> np.ndarray:
    """A random subset of ``pool`` with at most ``max_per_slide`` tiles per slide (ascending).

    Slides within the cap are kept whole (vectorised); only the slides above it draw a subset
    (one ``rng.choice`` per such slide): no pass over a mask or a sort of all tiles.
    """
    kept = np.minimum(runs.lengths, max_per_slide)
    out_start = np.concatenate([[0], np.cumsum(kept)[:-1]]).astype(np.int64)
    # Whole slides: position = slide start + rank within the slide.
    positions = np.repeat(runs.starts - out_start, kept) + np.arange(int(kept.sum()))
    for k in np.flatnonzero(runs.lengths > max_per_slide).tolist():
        picks = rng.choice(int(runs.lengths[k]), max_per_slide, replace=False, shuffle=False)
        first = int(out_start[k])
        positions[first : first + max_per_slide] = runs.starts[k] + np.sort(picks)
    if runs.order is None:
        return pool[positions]
    return np.sort(pool[runs.order[positions]])


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


class _BlockedPermutation:
    """A seeded bijection of ``[0, n)`` evaluated per position, never materialised.

    The n items are cut into M blocks of q or q + 1 items (M = ceil(n / block)). Position
    ``j = o * M + k`` (row o, slot k) takes item ``tau_b(o)`` of block ``b = sigma(a_o * k +
    c_o mod M)``: sigma is a random order of the blocks, (a_o, c_o) a random affine map per row
    (so rows group blocks differently), tau_b a random affine order of block b. The last,
    partial row takes the (q+1)-th item of the first r = n mod M blocks. Set-up is O(M + q).
    """

    def __init__(self, n: int, rng: np.random.Generator, block: int = PERMUTATION_BLOCK) -> None:
        self.n = n
        self.m = max(1, -(-n // block))
        self.q, self.r = divmod(n, self.m)
        self.sigma = rng.permutation(self.m)
        sizes = np.where(np.arange(self.m) < self.r, self.q + 1, self.q)
        self.block_start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.block_size = sizes.astype(np.int64)
        self.tau_a = _units(sizes, rng)
        self.tau_c = rng.integers(0, 1 << 62, self.m) % self.block_size
        row_mod = np.where(np.arange(self.q + 1) < self.q, self.m, max(self.r, 1))
        self.row_a = _units(row_mod, rng)
        self.row_c = rng.integers(0, 1 << 62, self.q + 1) % row_mod

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        j = np.asarray(positions, np.int64)
        o, k = np.divmod(j, self.m)
        full = o < self.q
        slot = np.empty_like(j)
        fo, fk = o[full], k[full]
        slot[full] = self.sigma[(self.row_a[fo] * fk + self.row_c[fo]) % self.m]
        tail = j[~full] - self.m * self.q  # the last row: blocks 0..r-1, their item q
        slot[~full] = (self.row_a[self.q] * tail + self.row_c[self.q]) % max(self.r, 1)
        offset = (self.tau_a[slot] * o + self.tau_c[slot]) % self.block_size[slot]
        return self.block_start[slot] + offset


def _units(moduli: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random multiplier coprime with each modulus (an affine map mod m is then a bijection)."""
    moduli = np.asarray(moduli, np.int64)
    out = np.ones(len(moduli), np.int64)
    todo = np.flatnonzero(moduli > 1)
    while len(todo):
        draw = rng.integers(1, 1 << 62, len(todo)) % moduli[todo]
        good = np.gcd(draw, moduli[todo]) == 1
        out[todo[good]] = draw[good]
        todo = todo[~good]
    return out


class _ShardStream:
    """Shards in random order, tiles of a shard in storage order, block-shuffled by ``buffer``.

    ``tiles`` (ascending) are the epoch's tiles; ``shard_first_tile`` the first tile index of
    each shard (ascending). Set-up is O(shards); each buffer block's permutation is drawn from
    its own seed when a batch first needs it.
    """

    def __init__(
        self,
        tiles: np.ndarray,
        shard_first_tile: np.ndarray,
        buffer: int,
        rng: np.random.Generator,
        block_seed: list[int],
    ) -> None:
        if isinstance(tiles, AllTiles):
            bounds = shard_first_tile
        else:  # each shard's first position in tiles
            bounds = np.searchsorted(tiles, shard_first_tile)
        bounds = np.r_[bounds, len(tiles)]
        starts, lengths = bounds[:-1], np.diff(bounds)
        nonempty = lengths > 0
        starts, lengths = starts[nonempty], lengths[nonempty]
        visit = rng.permutation(len(starts))
        self.shard_start = starts[visit].astype(np.int64)
        self.stream_start = np.concatenate([[0], np.cumsum(lengths[visit])[:-1]]).astype(np.int64)
        self.tiles = tiles
        self.n = len(tiles)
        self.buffer = max(int(buffer), 1)
        self._block_seed = block_seed
        self._blocks: dict[int, np.ndarray] = {}

    def _block(self, b: int) -> np.ndarray:
        perm = self._blocks.get(b)
        if perm is None:
            size = min(self.buffer, self.n - b * self.buffer)
            perm = np.random.default_rng([*self._block_seed, b]).permutation(size)
            if len(self._blocks) > 8:  # batches move forward: keep a few recent blocks
                self._blocks.clear()
            self._blocks[b] = perm
        return perm

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        j = np.asarray(positions, np.int64)
        b, within = np.divmod(j, self.buffer)
        stream = np.empty_like(j)
        by_block = np.argsort(b, kind="stable")
        sorted_b = b[by_block]
        cuts = np.flatnonzero(np.r_[True, sorted_b[1:] != sorted_b[:-1], True])
        for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
            here = by_block[lo:hi]
            block = int(sorted_b[lo])
            stream[here] = block * self.buffer + self._block(block)[within[here]]
        shard = np.searchsorted(self.stream_start, stream, side="right") - 1
        return self.tiles[self.shard_start[shard] + (stream - self.stream_start[shard])]


class EpochPlan:
    """The order of one epoch as a function: ``plan(positions)`` -> tile indices."""

    def __init__(self, tiles: np.ndarray, order) -> None:
        self.tiles = tiles
        self.n = len(tiles)
        self._order = order

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        return self._order(np.asarray(positions, np.int64))


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
        chunk_ids: per tile, the storage shard holding it (``PatchStore.chunk_ids``; shard mode
            only, non-decreasing along the table).
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
        shard_starts: the first tile index of each shard (``PatchStore.shard_starts()``), an
            O(shards) alternative to ``chunk_ids`` for shard mode.
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
        shuffle_buffer: int = 4096,
        max_tiles_per_slide: int | None = None,
        min_tissue: float = 0.0,
        drop_last: bool = True,
        shard_starts: np.ndarray | None = None,
        tile_mpp: np.ndarray | None = None,
        mpp_weights: dict[float, float] | None = None,
    ) -> None:
        _check_arguments(batch_size, rank, world_size, shuffle, shuffle_buffer, max_tiles_per_slide)
        self.slide_key = slide_key
        self.chunk_ids = chunk_ids
        passing = np.asarray(tissue_fraction) >= min_tissue
        self.pool = AllTiles(len(passing)) if passing.all() else np.flatnonzero(passing)
        del passing
        self._runs = slide_runs(self.pool, slide_key) if max_tiles_per_slide is not None else None
        self._shard_first_tile = None
        if shuffle == "shard":
            self._shard_first_tile = (
                np.asarray(shard_starts, np.int64)
                if shard_starts is not None
                else _shard_first_tiles(_required(chunk_ids))
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
        self._magnification = None
        if mpp_weights is not None:
            if tile_mpp is None:
                raise ScratchpathError("mpp_weights: needs the µm/px of every tile (tile_mpp)")
            self._magnification = magnification_groups(tile_mpp, mpp_weights)
        self._resume_at: tuple[int, int] | None = None
        self._cached: tuple[int, np.ndarray] | None = None
        self._plan: tuple[int, EpochPlan] | None = None
        self.tiles_per_epoch = len(self._epoch_tiles(0))
        self.num_samples = len(self) * batch_size
        self.total_size = self.num_samples * world_size

    @classmethod
    def from_store(cls, store: Any, **kwargs: Any) -> DistributedBatchSampler:
        """Plan over a :class:`~scratchpath.store.PatchStore` (or anything with its tile table)."""
        shard_mode = kwargs.get("shuffle", "tile") == "shard"
        if kwargs.get("mpp_weights") is not None:  # the µm/px column only when it is used
            kwargs.setdefault("tile_mpp", store.tiles["mpp"])
        return cls(
            slide_key=store.tiles["slide_index"],
            tissue_fraction=store.tiles["tissue_fraction"],
            # Shard mode needs where each shard starts: O(shards) from a PatchStore, else derived
            # from the per-tile chunk ids.
            chunk_ids=None if hasattr(store, "shard_starts") else store.chunk_ids,
            shard_starts=store.shard_starts()
            if shard_mode and hasattr(store, "shard_starts")
            else None,
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

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's order as a function of position (built once per epoch, O(shards) or
        O(tiles / block) unless ``max_tiles_per_slide`` draws a subset)."""
        if self._plan is None or self._plan[0] != epoch:
            tiles = self._epoch_tiles(epoch)
            rng = _epoch_rng(self.seed, epoch, _STREAM_ORDER)
            if self.shuffle_mode == "shard":
                block_seed = [self.seed, epoch, _STREAM_ORDER]
                order = _ShardStream(
                    tiles, self._shard_first_tile, self.shuffle_buffer, rng, block_seed
                )
            elif len(tiles) <= EXACT_SHUFFLE_TILES:
                order = tiles[rng.permutation(len(tiles))].__getitem__
            else:
                permutation = _BlockedPermutation(len(tiles), rng)
                identity = _is_range(tiles)
                order = permutation if identity else (lambda j: tiles[permutation(j)])
            self._plan = (epoch, EpochPlan(tiles, order))
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

    def _epoch_tiles(self, epoch: int) -> np.ndarray:
        tiles = self.pool
        if self.max_tiles_per_slide is not None:
            rng = _epoch_rng(self.seed, epoch, _STREAM_SLIDE_BALANCE)
            tiles = balance_slides(tiles, self._runs, self.max_tiles_per_slide, rng)
        if self._magnification is not None:
            rng = _epoch_rng(self.seed, epoch, _STREAM_MAGNIFICATION)
            if isinstance(tiles, AllTiles):
                tiles = np.arange(len(tiles), dtype=np.int64)
            tiles = weight_magnifications(tiles, *self._magnification, rng)
        return tiles


def _shard_first_tiles(chunk_ids: np.ndarray) -> np.ndarray:
    """First tile index of each shard run along the table (shards are contiguous in a store)."""
    if len(chunk_ids) == 0:
        return np.zeros(0, np.int64)
    if not (chunk_ids[1:] >= chunk_ids[:-1]).all():
        raise ScratchpathError("chunk_ids: shard mode needs each shard's tiles contiguous")
    return np.flatnonzero(np.r_[True, chunk_ids[1:] != chunk_ids[:-1]]).astype(np.int64)


def _required(chunk_ids: np.ndarray | None) -> np.ndarray:
    if chunk_ids is None:
        raise ScratchpathError("chunk_ids: shard mode needs the shard of every tile")
    return np.asarray(chunk_ids)


def _is_range(tiles: np.ndarray) -> bool:
    """True if ``tiles`` is 0, 1, ..., n-1 (every tile in the pool: no gather needed)."""
    if isinstance(tiles, AllTiles) or len(tiles) == 0:
        return True
    if int(tiles[0]) != 0 or int(tiles[-1]) != len(tiles) - 1:
        return False
    return bool((np.diff(tiles) > 0).all())  # magnification weights may repeat tiles


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
