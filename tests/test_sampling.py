"""The sampler's options at archive scale: O(slides + shards) state, exact rank/select, uniform
keyed subsets, and the cap, tissue filter and magnification weights combined.

Synthetic tile tables (no pixels are read); behaviour on real stores is in test_data.py and
test_magnifications.py.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from scratchpath.data.sampling import DistributedBatchSampler
from scratchpath.data.sampling.permute import keyed_permutation
from scratchpath.data.sampling.units import PassingTiles

MPPS = np.array([0.25, 0.5, 1.0, 2.0])


class _Table:
    """A store's tile table: ``slides`` slides of ``per_slide`` tiles, each slide's tiles at 4
    µm/px one after the other (as ingest writes them), shards of ``shard`` tiles."""

    def __init__(self, slides: int, per_slide: int, shard: int = 64, seed: int = 0) -> None:
        n = slides * per_slide
        within = np.arange(n) % per_slide
        self.tiles = {
            "slide_index": np.arange(n) // per_slide,
            "mpp": MPPS[np.minimum(within * 4 // per_slide, 3)],
            "tissue_fraction": np.random.default_rng(seed).random(n).astype(np.float32),
        }
        firsts = np.arange(slides) * per_slide
        self._slides = firsts
        self._shards = (firsts[:, None] + np.arange(0, per_slide, shard)).ravel()

    def __len__(self) -> int:
        return len(self.tiles["slide_index"])

    def slide_starts(self) -> np.ndarray:
        return self._slides

    def shard_starts(self) -> np.ndarray:
        return self._shards


def test_rank_and_select_match_a_plain_count() -> None:
    tissue = np.random.default_rng(1).random(5037).astype(np.float32)
    passing = PassingTiles(tissue, 0.4)
    expected = np.flatnonzero(tissue >= 0.4)
    assert passing.count == len(expected)
    np.testing.assert_array_equal(passing.select(np.arange(len(expected))), expected)
    before = np.concatenate([[0], np.cumsum(tissue >= 0.4)])
    np.testing.assert_array_equal(passing.rank(np.arange(len(tissue) + 1)), before)


def test_keyed_permutations_are_bijections_per_element() -> None:
    sizes = [1, 2, 3, 7, 64, 1000, 4099]
    index = np.concatenate([np.arange(s) for s in sizes])
    size = np.repeat(sizes, sizes)
    key = np.repeat(np.arange(len(sizes)) * 977 + 5, sizes).astype(np.uint64)
    out = keyed_permutation(index, size, key)
    for s, part in zip(sizes, np.split(out, np.cumsum(sizes)[:-1]), strict=True):
        np.testing.assert_array_equal(np.sort(part), np.arange(s))
    other = keyed_permutation(np.arange(1000), 1000, 12345)
    assert not np.array_equal(other, out[np.cumsum(sizes)[4] : np.cumsum(sizes)[5]])


def test_keyed_subsets_include_every_element_equally_often() -> None:
    # The first 10 of a keyed permutation of 50, for 4000 keys: each element should be drawn
    # Binomial(4000, 0.2) times (mean 800, sd 25).
    keys = np.repeat(np.arange(4000, dtype=np.uint64) * 7919 + 1, 10)
    drawn = keyed_permutation(np.tile(np.arange(10), 4000), 50, keys)
    counts = np.bincount(drawn, minlength=50)
    assert np.abs(counts - 800).max() < 6 * 25


def test_capped_slides_keep_each_tile_with_equal_probability() -> None:
    table = _Table(slides=3, per_slide=640)  # 10 shards of 64 per slide: 10 units per slide
    sampler = DistributedBatchSampler.from_store(table, batch_size=1, max_tiles_per_slide=100)
    assert sampler.tiles_per_epoch == 300
    chosen = np.zeros(len(table), np.int64)
    for epoch in range(200):
        tiles = sampler.epoch_order(epoch)
        assert len(np.unique(tiles)) == 300  # no tile twice
        np.testing.assert_array_equal(np.bincount(tiles // 640), [100, 100, 100])
        chosen[tiles] += 1
    # Each tile kept with probability 100/640 per epoch: 31 times in 200 on average.
    assert chosen.min() >= 10 and chosen.max() <= 60
    per_shard = chosen.reshape(-1, 64).sum(axis=1)  # stratified: every shard its share
    assert np.abs(per_shard - 200 * 10).max() <= 200


def test_cap_tissue_and_weights_combine_deterministically() -> None:
    table = _Table(slides=20, per_slide=400)
    weights = {0.25: 1.0, 1.0: 1.0}
    kwargs = {"batch_size": 1, "max_tiles_per_slide": 40, "min_tissue": 0.3, "seed": 5,
              "mpp_weights": weights}  # fmt: skip
    sampler = DistributedBatchSampler.from_store(table, **kwargs)
    order = sampler.epoch_order(2)
    assert len(order) == sampler.tiles_per_epoch == 20 * 40
    assert (table.tiles["tissue_fraction"][order] >= 0.3).all()
    slide, mpp = table.tiles["slide_index"][order], table.tiles["mpp"][order]
    assert set(np.unique(mpp)) == {0.25, 1.0}  # unweighted µm/px never sampled
    assert (mpp == 0.25).sum() == (mpp == 1.0).sum() == 400  # equal weights: equal shares
    for s in range(20):  # the cap bounds the distinct tiles of a slide (weights may repeat)
        assert len(np.unique(order[slide == s])) <= 40
    again = DistributedBatchSampler.from_store(table, **kwargs).epoch_order(2)
    np.testing.assert_array_equal(order, again)
    assert not np.array_equal(np.sort(order), np.sort(sampler.epoch_order(3)))
    by_shard = DistributedBatchSampler.from_store(
        table, shuffle="shard", shuffle_buffer=1, **kwargs
    )
    shard_order = by_shard.epoch_order(2)  # the same tiles, visited shard by shard
    np.testing.assert_array_equal(np.sort(shard_order), np.sort(order))
    # Each (shard, µm/px) run is read in one go.
    shard = np.searchsorted(table.shard_starts(), shard_order, side="right")
    unit = shard * 4 + np.searchsorted(MPPS, table.tiles["mpp"][shard_order])
    assert 1 + np.count_nonzero(unit[1:] != unit[:-1]) == len(np.unique(unit))


def _reachable_arrays(root: object) -> list[np.ndarray]:
    """numpy arrays reachable from ``root`` through scratchpath objects, containers and
    closures (not through modules)."""
    seen, stack, arrays = set(), [root], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            arrays.append(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple):
            stack.extend(obj)
        elif isinstance(obj, types.FunctionType):
            stack.extend(cell.cell_contents for cell in obj.__closure__ or ())
        elif isinstance(obj, types.MethodType):
            stack.append(obj.__self__)
        elif type(obj).__module__.startswith("scratchpath.") and hasattr(obj, "__dict__"):
            stack.append(vars(obj))
    return arrays


@pytest.mark.parametrize("shuffle", ["tile", "shard"])
def test_the_sampler_holds_no_per_tile_array(shuffle: str, monkeypatch) -> None:
    from scratchpath.data.sampling import order

    monkeypatch.setattr(order, "EXACT_SHUFFLE_TILES", 0)  # the large-store path, as at 10^8
    table = _Table(slides=100, per_slide=20_000, shard=1024)  # 2M tiles, 2,000 shards
    sampler = DistributedBatchSampler.from_store(
        table, batch_size=64, world_size=2, shuffle=shuffle, max_tiles_per_slide=5000,
        min_tissue=0.2, mpp_weights={0.25: 1.0, 0.5: 1.0},
    )  # fmt: skip
    sampler.set_epoch(1)
    next(iter(sampler))
    held = sum(a.nbytes for a in _reachable_arrays(sampler))
    # The 1-bit tissue filter (0.125 B/tile) and ~4,000 units x a few int64: no 8-byte index
    # per tile (which alone would be 8 B/tile).
    assert held < 0.5 * len(table)
