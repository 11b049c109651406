"""The order of an epoch's positions: ``shuffle: tile`` and ``shuffle: shard`` (step 3).

Both are functions from order position to epoch position (then to a tile through
:class:`~scratchpath.data.sampling.epoch.EpochTiles`), built once per epoch:

- tile: a uniform permutation up to ``EXACT_SHUFFLE_TILES`` positions, a
  :class:`~scratchpath.data.sampling.permute.BlockedPermutation` above (O(n / 4096) set-up).
- shard: the epoch's units (runs of one shard) in a random order, each unit's positions in a
  row, block-shuffled by a buffer of ``shuffle_buffer`` positions (O(units) set-up; each
  block's permutation drawn from its own seed when a batch first needs it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from scratchpath.data.sampling.epoch import EpochTiles
from scratchpath.data.sampling.permute import BlockedPermutation

# Epochs up to this size are shuffled with a uniform permutation (~0.1 s, 8 bytes a position);
# larger ones with a blocked permutation that is never materialised.
EXACT_SHUFFLE_TILES = 1 << 22


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
        self.tiles = tiles
        self.n = tiles.n
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
        unit = np.searchsorted(self.stream_start, stream, side="right") - 1
        return self.tiles(self.unit_offset[unit] + (stream - self.stream_start[unit]))
