"""One epoch's tiles, decided per unit and evaluated per position: O(units) per epoch.

Steps 1-2b of :mod:`scratchpath.data.sampling`, made without a per-tile array:

- **cap** (``max_tiles_per_slide=K``): a slide with ``c > K`` passing tiles keeps ``K``; they
  are spread over its units in proportion to the units' passing tiles by systematic sampling
  with a random start (each unit gets the floor or the ceiling of its share, so each tile is
  kept with probability ``K / c``), and each unit keeps that many of its tiles, a fresh random
  subset per epoch (the first positions of a keyed permutation of the unit).
- **magnification weights**: the epoch keeps as many tiles as after the cap; magnification
  ``k`` gets ``w_k / sum(w)`` of them (largest remainder, over the magnifications present), spread
  over its units in proportion to the tiles each kept, the same way. A unit asked for more tiles
  than it kept repeats them, each once more before any twice.

The epoch is then a function from position to tile: unit ``u`` owns ``quota[u]`` consecutive
positions; position ``offset[u] + i`` is passing tile ``perm_u(i mod kept_u)`` of the unit
(``perm_u`` drawn per unit and epoch; the identity when the unit is taken whole). Positions are
grouped by unit, so they are grouped by shard: what the shard-mode stream needs.
"""

from __future__ import annotations

import numpy as np

from scratchpath.data.sampling.permute import keyed_permutation
from scratchpath.data.sampling.units import PassingTiles, Units


class EpochTiles:
    """The tiles of one epoch as a function of position (see the module docstring)."""

    def __init__(
        self,
        units: Units,
        passing: PassingTiles | None,
        kept: np.ndarray,
        quota: np.ndarray,
        keys: np.ndarray,
    ) -> None:
        used = np.flatnonzero(quota > 0)
        self.quota = quota[used].astype(np.int64)
        self.offset = np.concatenate([[0], np.cumsum(self.quota)[:-1]]).astype(np.int64)
        self.n = int(self.quota.sum())
        self._kept = kept[used].astype(np.int64)
        self._size = units.passing[used]
        self._base = (units.base if passing is not None else units.start)[used]
        # A permutation only where the unit is not taken exactly once, in storage order.
        self._permuted = (self._kept < self._size) | (self.quota != self._size)
        self._keys = keys[used]
        self._passing = passing
        # Every tile once, in table order (the default path): position = tile, nothing looked up.
        whole = len(used) == 0 or (
            self._base[0] == 0 and bool((np.diff(self._base) == self.quota[:-1]).all())
        )
        self.identity = passing is None and not self._permuted.any() and whole

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        pos = np.asarray(positions, np.int64)
        if self.identity:
            return pos
        unit = np.searchsorted(self.offset, pos, side="right") - 1
        i = (pos - self.offset[unit]) % self._kept[unit]
        permuted = self._permuted[unit]
        if permuted.any():
            u = unit[permuted]
            i[permuted] = keyed_permutation(i[permuted], self._size[u], self._keys[u])
        rank = self._base[unit] + i
        return rank if self._passing is None else self._passing.select(rank)


def plan_epoch(
    units: Units,
    passing: PassingTiles | None,
    *,
    max_per_slide: int | None,
    weights: np.ndarray | None,
    rng_cap: np.random.Generator,
    rng_weights: np.random.Generator,
    rng_keys: np.random.Generator,
) -> EpochTiles:
    """The epoch's :class:`EpochTiles`: cap, then magnification weights (module docstring)."""
    kept = units.passing
    if max_per_slide is not None:
        per_slide = np.bincount(units.slide, weights=units.passing).astype(np.int64)
        kept = allocate(np.minimum(per_slide, max_per_slide), kept, units.slide, rng_cap)
    quota = kept
    if weights is not None:
        present = np.bincount(units.group[units.group >= 0], weights=kept[units.group >= 0],
                              minlength=len(weights)) > 0  # fmt: skip
        counts = _largest_remainder(np.where(present, weights, 0.0), int(kept.sum()))
        owner = np.where(units.group >= 0, units.group, len(weights))  # len(weights): unweighted
        quota = allocate(np.append(counts, 0), kept, owner, rng_weights)
    keys = rng_keys.integers(0, 1 << 63, len(units), dtype=np.uint64)
    return EpochTiles(units, passing, kept, quota, keys)


def allocate(
    totals: np.ndarray, weight: np.ndarray, owner: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Split ``totals[g]`` among the units ``u`` with ``owner[u] == g`` in proportion to
    ``weight[u]``: systematic sampling with a random start, exact in integers, so each unit gets
    the floor or the ceiling of its share and the shares add up to the total (0 where a group
    has no weight)."""
    totals = np.asarray(totals, np.int64)
    weight = np.asarray(weight, np.int64)
    order = np.argsort(owner, kind="stable")
    w, g = weight[order], np.asarray(owner)[order]
    group_weight = np.bincount(g, weights=w, minlength=len(totals)).astype(np.int64)
    before = np.cumsum(w) - w  # weight of the units before each, over all groups ...
    before -= (np.cumsum(group_weight) - group_weight)[g]  # ... made relative to its group
    start = (rng.random(len(totals)) * np.maximum(group_weight, 1)).astype(np.int64)
    total, denominator = totals[g], np.maximum(group_weight[g], 1)
    if len(w) and int(group_weight.max()) * int(max(totals.max(), 1)) >= 1 << 62:
        before, w, total = (a.astype(object) for a in (before, w, total))  # exact big integers
    share = ((before + w) * total + start[g]) // denominator - (before * total + start[g]) // (
        denominator
    )
    out = np.zeros(len(weight), np.int64)
    out[order] = np.asarray(share, np.int64)
    return out


def _largest_remainder(weights: np.ndarray, n: int) -> np.ndarray:
    """``n`` split by ``weights`` (normalised here) into integers, largest remainders first."""
    if weights.sum() <= 0:
        return np.zeros(len(weights), np.int64)
    quota = weights / weights.sum() * n
    counts = np.floor(quota).astype(np.int64)
    counts[np.argsort(-(quota - counts), kind="stable")[: n - counts.sum()]] += 1
    return counts
