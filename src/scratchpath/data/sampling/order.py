"""The order of an epoch's positions: ``shuffle: tile`` and ``shuffle: shard`` (step 3).

Both are functions from order position to epoch position (then to a tile through
:class:`~scratchpath.data.sampling.epoch.EpochTiles`), built once per epoch:

- tile: a uniform permutation up to ``EXACT_SHUFFLE_TILES`` positions, a
  :class:`~scratchpath.data.sampling.permute.BlockedPermutation` above (O(n / 4096) set-up).
- shard: the epoch's units (runs of one shard) in a random order, each unit's positions in a
  row, cut into windows of whole units and each window shuffled (a uniform permutation drawn
  from its own seed when a batch first needs it). A window holds about ``shuffle_buffer``
  tiles but never more than ``WINDOW_SHARDS`` units, so a reader keeps every shard file of a
  window open (it keeps 128) whatever the tiles per shard: with full 1,024-tile shards the
  default 65,536-tile buffer is 64 shards; with 100-tile shards (small biopsies, a tight
  ``max_tiles_per_slide``) a window is 64 shards of 6,400 tiles, not 655 shards thrashing the
  open-file cache. O(units) set-up.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from scratchpath.data.sampling.epoch import EpochTiles
from scratchpath.data.sampling.permute import BlockedPermutation

# Epochs up to this size are shuffled with a uniform permutation (~0.1 s, 8 bytes a position);
# larger ones with a blocked permutation that is never materialised.
EXACT_SHUFFLE_TILES = 1 << 22
# Shard mode: units (shard files) per shuffle window, at most; half the reader's open files.
WINDOW_SHARDS = 64


def tile_order(tiles: EpochTiles, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """Order position -> tile for ``shuffle: tile``."""
    if tiles.n <= EXACT_SHUFFLE_TILES:
        permutation = rng.permutation(tiles.n)
        return lambda j: tiles(permutation[j])
    blocked = BlockedPermutation(tiles.n, rng)
    return lambda j: tiles(blocked(j))


class ShardStream:
    """Order position -> tile for ``shuffle: shard`` (see the module docstring)."""

    def __init__(
        self, tiles: EpochTiles, buffer: int, rng: np.random.Generator, block_seed: list[int]
    ) -> None:
        visit = rng.permutation(len(tiles.offset))
        self.unit_offset = tiles.offset[visit]
        lengths = tiles.quota[visit]
        self.stream_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        mean = tiles.n / max(len(lengths), 1)
        per_window = int(np.clip(round(max(int(buffer), 1) / max(mean, 1)), 1, WINDOW_SHARDS))
        # Window k: units k * per_window ... (k + 1) * per_window - 1 of the visit order.
        self.window_start = np.append(self.stream_start[::per_window], tiles.n).astype(np.int64)
        self.tiles = tiles
        self.n = tiles.n
        self._block_seed = block_seed
        self._windows: dict[int, np.ndarray] = {}

    def _window(self, w: int) -> np.ndarray:
        perm = self._windows.get(w)
        if perm is None:
            size = int(self.window_start[w + 1] - self.window_start[w])
            perm = np.random.default_rng([*self._block_seed, w]).permutation(size)
            if len(self._windows) > 8:  # batches move forward: keep a few recent windows
                self._windows.clear()
            self._windows[w] = perm
        return perm

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        j = np.asarray(positions, np.int64)
        window = np.searchsorted(self.window_start, j, side="right") - 1
        stream = np.empty_like(j)
        by_window = np.argsort(window, kind="stable")
        sorted_w = window[by_window]
        cuts = np.flatnonzero(np.r_[True, sorted_w[1:] != sorted_w[:-1], True])
        for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
            here = by_window[lo:hi]
            w = int(sorted_w[lo])
            start = self.window_start[w]
            stream[here] = start + self._window(w)[j[here] - start]
        unit = np.searchsorted(self.stream_start, stream, side="right") - 1
        return self.tiles(self.unit_offset[unit] + (stream - self.stream_start[unit]))
