"""What the sampler keeps of the tile table: O(slides + shards) units and a 1-bit tissue filter.

A **unit** is a maximal run of tiles, contiguous in the table, of one slide, one storage shard
and (with ``mpp_weights``) one µm/px. A store writes a slide's tiles contiguously, each µm/px of
a slide one after the other and a slide from a fresh shard, so a store holds about
``slides x magnifications + shards`` units. Every per-epoch decision (which tiles of a slide
pass the cap, how many of each magnification) is made per unit, so planning never touches a
per-tile array.

The tissue filter (``tissue_fraction >= min_tissue``) is kept as :class:`PassingTiles`: one bit
per tile and one count per 512 tiles (0.14 bytes per tile in all), answering "how many tiles
before position p pass" (rank) and "where is the k-th passing tile" (select) in O(1).

Set-up reads the columns it needs once, in chunks of 4M tiles (bounded memory): the tissue
fraction when ``min_tissue`` is set, the µm/px when ``mpp_weights`` is, and the slide column
only for a table that does not list its slide starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scratchpath.errors import ScratchpathError

_CHUNK = 1 << 22  # tiles per pass over a column (a multiple of the rank block)
RANK_BLOCK = 512  # tiles per counted block: 8 words of 64 bits
MPP_MATCH = 0.10  # relative distance within which a tile's µm/px counts as a weighted one


class PassingTiles:
    """Rank and select over the tiles with ``tissue_fraction >= min_tissue``."""

    def __init__(self, tissue_fraction: np.ndarray, min_tissue: float) -> None:
        n = len(tissue_fraction)
        n_blocks = -(-n // RANK_BLOCK)
        self.n = n
        # One spare zero block: rank(n) and select near the end need no special case.
        self.words = np.zeros((n_blocks + 1) * 8, np.uint64)
        as_bytes = self.words.view(np.uint8)
        for lo in range(0, n, _CHUNK):
            passing = np.asarray(tissue_fraction[lo : lo + _CHUNK]) >= min_tissue
            packed = np.packbits(passing, bitorder="little")  # bit k of byte b: tile 8b + k
            as_bytes[lo // 8 : lo // 8 + len(packed)] = packed
        per_block = np.bitwise_count(self.words).reshape(-1, 8).sum(axis=1, dtype=np.int64)
        self.cum = np.concatenate([[0], np.cumsum(per_block)]).astype(np.int64)
        self.count = int(self.cum[n_blocks])

    def rank(self, positions: np.ndarray) -> np.ndarray:
        """Passing tiles before each position (``0 <= position <= n``)."""
        pos = np.asarray(positions, np.int64)
        block, within = np.divmod(pos, RANK_BLOCK)
        words = self.words[block[:, None] * 8 + np.arange(8)]  # (Q, 8)
        full = within // 64
        counts = np.bitwise_count(words).astype(np.int64)
        before = np.where(np.arange(8) < full[:, None], counts, 0).sum(axis=1)
        last = words[np.arange(len(pos)), full]
        mask = (np.uint64(1) << (within % 64).astype(np.uint64)) - np.uint64(1)
        return self.cum[block] + before + np.bitwise_count(last & mask).astype(np.int64)

    def select(self, ranks: np.ndarray) -> np.ndarray:
        """The position of the ``k``-th passing tile (0-based) for each ``k`` in ``ranks``."""
        k = np.asarray(ranks, np.int64)
        block = np.searchsorted(self.cum, k, side="right") - 1
        need = k - self.cum[block]
        words = self.words[block[:, None] * 8 + np.arange(8)]  # (Q, 8)
        counts = np.bitwise_count(words).astype(np.int64)
        cumulative = np.cumsum(counts, axis=1)
        word = np.argmax(cumulative > need[:, None], axis=1)
        rows = np.arange(len(k))
        need -= cumulative[rows, word] - counts[rows, word]
        bits = (words[rows, word][:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
        bit = np.argmax(np.cumsum(bits, axis=1) > need[:, None], axis=1)
        return block * RANK_BLOCK + word * 64 + bit


@dataclass
class Units:
    """Runs of tiles sharing slide, shard and (with weights) µm/px; all arrays (U,) int64."""

    start: np.ndarray  # first tile
    length: np.ndarray  # tiles
    slide: np.ndarray  # slide of the run, compacted to 0 .. slides-1
    group: np.ndarray  # index of its weighted µm/px (-1: none, or no weights)
    passing: np.ndarray  # its tiles that pass min_tissue
    base: np.ndarray  # passing tiles before it (where its passing tiles start in select)

    def __len__(self) -> int:
        return len(self.start)


def tile_units(
    n: int,
    *,
    slide_key: np.ndarray,
    slide_starts: np.ndarray | None = None,
    shard_starts: np.ndarray | None = None,
    tile_mpp: np.ndarray | None = None,
    mpp_keys: np.ndarray | None = None,
    passing: PassingTiles | None = None,
) -> Units:
    """The units of a table of ``n`` tiles (see the module docstring).

    ``slide_starts`` / ``shard_starts``: the first tile of each slide / shard when the store
    knows them (O(slides + shards)); else slide runs are found by scanning ``slide_key``.
    ``tile_mpp`` and ``mpp_keys`` (the weighted µm/px, ascending): split runs by µm/px and give
    each unit the index of its weighted µm/px.
    """
    cuts = [np.zeros(1, np.int64)]
    if slide_starts is not None:
        cuts.append(np.asarray(slide_starts, np.int64))
    else:
        cuts.append(change_points(slide_key))
    if shard_starts is not None:
        cuts.append(np.asarray(shard_starts, np.int64))
    if mpp_keys is not None:
        cuts.append(change_points(tile_mpp, equal_nan=True))
    start = np.unique(np.concatenate(cuts))
    start = start[start < n] if n else start[:0]
    length = np.diff(np.append(start, n))
    # Slide ids compacted to 0..S-1 (a slide split into several runs keeps one id).
    _, slide = np.unique(np.asarray(slide_key[start], np.int64), return_inverse=True)
    group = np.full(len(start), -1, np.int64)
    if mpp_keys is not None:
        group = match_magnifications(np.asarray(tile_mpp[start], np.float64), mpp_keys)
    if passing is None:
        counts, base = length, start
    else:
        ranks = passing.rank(np.append(start, n))
        counts, base = np.diff(ranks), ranks[:-1]
    return Units(start, length, slide.reshape(-1).astype(np.int64), group, counts, base)


def change_points(column: np.ndarray, *, equal_nan: bool = False) -> np.ndarray:
    """Indices ``i > 0`` where ``column[i] != column[i - 1]``, read in chunks (O(changes)
    memory); with ``equal_nan`` a run of NaN is one run."""
    n = len(column)
    found = []
    for lo in range(0, n, _CHUNK):
        part = np.asarray(column[max(lo - 1, 0) : lo + _CHUNK])  # one tile of overlap
        differs = part[1:] != part[:-1]
        if equal_nan and part.dtype.kind == "f":
            differs &= ~(np.isnan(part[1:]) & np.isnan(part[:-1]))
        found.append(np.flatnonzero(differs) + max(lo - 1, 0) + 1)
    return np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)


def magnification_keys(mpp_weights: dict[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The weighted µm/px (ascending) and their normalised weights."""
    keys = np.array(sorted(mpp_weights), np.float64)
    weights = np.array([mpp_weights[k] for k in sorted(mpp_weights)], np.float64)
    if len(keys) == 0 or (keys <= 0).any() or (weights < 0).any() or weights.sum() <= 0:
        raise ScratchpathError(
            f"mpp_weights: needs positive µm/px keys and non-negative weights with a positive "
            f"sum, got {mpp_weights}"
        )
    return keys, weights / weights.sum()


def match_magnifications(mpp: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Per value, the index of the nearest weighted µm/px within :data:`MPP_MATCH`, else -1
    (unknown µm/px, NaN, never matches)."""
    mpp = np.asarray(mpp, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        distance = np.abs(np.log(mpp[:, None] / keys[None, :]))  # (values, keys): scale-free
    distance = np.where(np.isnan(distance), np.inf, distance)
    group = distance.argmin(axis=1) if len(keys) else np.zeros(len(mpp), np.int64)
    close = distance[np.arange(len(mpp)), group] <= np.log1p(MPP_MATCH)
    return np.where(close, group, -1).astype(np.int64)
