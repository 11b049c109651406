"""Several µm/px in one store: ingest --mpp 0.5 1 2 4, info per µm/px, weighted sampling."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from scratchpath.cli import info as info_cli
from scratchpath.cli import ingest as ingest_cli
from scratchpath.data import DistributedBatchSampler, PatchDataModule
from scratchpath.errors import ScratchpathError
from scratchpath.ingest import ingest
from scratchpath.slides import Slide, open_slide
from scratchpath.store import PatchStore
from scratchpath.views import TwoViews

CMU = "CMU-1-Small-Region.svs"
OME = "CMU-1-Small-Region_derived_pyramid.ome.tif"  # 4 levels, 0.499 µm/px doubling
MPPS = (0.5, 1.0, 2.0, 4.0)
TILE = 64


def _rows(store: PatchStore, keep: np.ndarray | None = None) -> list[tuple]:
    t = store.tiles
    keep = np.ones(len(store), bool) if keep is None else keep
    cols = [t[k][keep] for k in ("x", "y", "level", "mpp", "tissue_fraction")]
    return sorted(
        (int(x), int(y), int(lv), float(m), float(f)) for x, y, lv, m, f in zip(*cols, strict=True)
    )


@pytest.fixture(scope="module")
def multi(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("multi") / "store"
    parser = argparse.ArgumentParser(prog="scratchpath")
    ingest_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["ingest", str(slides_dir / OME), "--out", str(out), "--mpp",
                              *map(str, MPPS), "--tile-size", str(TILE), "--codec", "zstd",
                              "--no-progress"])  # fmt: skip
    assert args.run(args) == 0
    return out


def test_each_mpp_comes_from_its_nearest_finer_level_area_downsampled(
    multi: Path, slides_dir: Path
) -> None:
    store = PatchStore(multi)
    t = store.tiles
    with open_slide(slides_dir / OME) as slide:
        for k, target in enumerate(MPPS):
            rows = np.flatnonzero(np.abs(t["mpp"] / target - 1) < 0.05)
            assert len(rows) > 0
            assert set(t["level"][rows]) == {k}  # 0.499 * 2**k is within 5 % of the target
            assert (t["tissue_fraction"][rows] >= 0.5).all()  # tissue filtered at each µm/px
            downsample = slide.levels[k].downsample
            for i in rows[:: max(1, len(rows) // 6)]:
                x, y = round(int(t["x"][i]) / downsample), round(int(t["y"][i]) / downsample)
                np.testing.assert_array_equal(store[i], slide.read_region(k, x, y, TILE, TILE))
    # Level-0 corners link magnifications: every coarse tile holds fine tiles inside it.
    fine = np.abs(t["mpp"] / 0.5 - 1) < 0.05
    coarse = np.flatnonzero(np.abs(t["mpp"] / 2.0 - 1) < 0.05)
    span = 4 * TILE * 0.5 / 0.499  # level-0 px under a 2 µm/px tile
    inside = [
        ((t["x"][fine] >= t["x"][c]) & (t["x"][fine] < t["x"][c] + span)
         & (t["y"][fine] >= t["y"][c]) & (t["y"][fine] < t["y"][c] + span)).sum()
        for c in coarse
    ]  # fmt: skip
    assert min(inside) >= 1


def test_several_mpp_in_one_pass_equal_one_run_per_mpp(
    multi: Path, slides_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PatchStore(multi)
    record = store.slides[0]
    assert record["target_mpp"] == list(MPPS) and record["level"] == [0, 1, 2, 3]
    counts = record["tiles_per_mpp"]
    assert sum(counts.values()) == len(store) == record["n_tiles"]
    for target in MPPS:
        out = tmp_path / f"single-{target}"
        ingest([slides_dir / OME], out, mpp=target, tile_size=TILE, codec="zstd", progress=False)
        single = PatchStore(out)
        assert counts[f"{target:g}"] == len(single)
        keep = np.abs(store.tiles["mpp"] / target - 1) < 0.05
        assert _rows(store, keep) == _rows(single)
    # One pass: the slide's thumbnail and tissue mask are built once for all four µm/px.
    calls = []
    original = Slide.thumbnail
    monkeypatch.setattr(Slide, "thumbnail", lambda self, *a: calls.append(1) or original(self, *a))
    ingest([slides_dir / OME], tmp_path / "again", mpp=MPPS, tile_size=TILE, progress=False)
    assert len(calls) == 1


def test_mpp_finer_than_a_slide_is_left_out_for_that_slide_only(
    slides_dir: Path, tmp_path: Path
) -> None:
    report = ingest([slides_dir / CMU], tmp_path / "s", mpp=(0.25, 1.0), tile_size=TILE,
                    codec="zstd", progress=False)  # fmt: skip
    assert report.ok
    store = PatchStore(tmp_path / "s")
    assert set(np.round(store.tiles["mpp"], 1)) == {1.0}
    assert "0.25 µm/px (would need upsampling)" in store.slides[0]["mpp_not_cut"][0]
    with pytest.raises(ScratchpathError, match=r"^mpp: "):
        ingest([slides_dir / CMU], tmp_path / "t", mpp=(0.5, -1.0), progress=False)


def test_info_shows_tiles_per_mpp(multi: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser(prog="scratchpath")
    info_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["info", str(multi), "--json"])
    assert args.run(args) == 0
    summary = json.loads(capsys.readouterr().out)
    counts = PatchStore(multi).slides[0]["tiles_per_mpp"]
    assert summary["tiles_per_mpp"] == {k: counts[k] for k in ("0.5", "1", "2", "4")}
    args = parser.parse_args(["info", str(multi)])
    args.run(args)
    text = capsys.readouterr().out
    assert "4 magnifications" in text and f"0.5 µm/px  {counts['0.5']} tiles" in text


class _MultiMppTable:
    """Only the tile table the sampler reads: 5 slides, each with tiles at 5 µm/px."""

    def __init__(self, tile_mpp: np.ndarray) -> None:
        n = len(tile_mpp)
        self.tiles = {"slide_index": np.arange(n) * 5 // n, "mpp": tile_mpp,
                      "tissue_fraction": np.ones(n, np.float32)}  # fmt: skip

    def __len__(self) -> int:
        return len(self.tiles["mpp"])


def _epoch(tile_mpp: np.ndarray, weights: dict[float, float], epoch: int = 0) -> np.ndarray:
    sampler = DistributedBatchSampler.from_store(_MultiMppTable(tile_mpp), batch_size=1,
                                                 mpp_weights=weights, seed=0)  # fmt: skip
    return sampler.epoch_order(epoch)


def test_weights_set_each_magnification_share_exactly() -> None:
    # Per slide: 80 tiles at 0.25, 40 at 0.5, 20 at 1, 10 at 2, 6 at 8 µm/px (780 in all).
    per_slide = np.repeat([0.25, 0.5, 1.0, 2.0, 8.0], [80, 40, 20, 10, 6])
    tile_mpp = np.tile(per_slide, 5)
    tile_mpp[tile_mpp == 0.25] *= 0.996  # a slide scanned at 0.249 still counts as 0.25
    drawn = _epoch(tile_mpp, {0.25: 1, 0.5: 1, 1.0: 1, 2.0: 1})
    assert len(drawn) == 780  # the epoch keeps its size; 8 µm/px has no weight: never sampled
    level = np.rint(np.log2(tile_mpp / 0.249)).astype(int)
    np.testing.assert_array_equal(np.bincount(level[drawn], minlength=6), [195] * 4 + [0, 0])
    per_tile = np.bincount(drawn, minlength=len(tile_mpp))
    assert per_tile[level == 0].max() == 1  # 195 from 400: subsampled, no repeats
    assert set(per_tile[level == 2]) == {1, 2}  # 195 from 100: each once or twice
    assert set(per_tile[level == 3]) == {3, 4}  # 195 from 50
    drawn = _epoch(tile_mpp, {0.5: 3, 1.0: 1, 2.0: 0})
    np.testing.assert_array_equal(np.bincount(level[drawn], minlength=6), [0, 585, 195, 0, 0, 0])
    with pytest.raises(ScratchpathError, match=r"^mpp_weights: "):
        _epoch(tile_mpp, {0.5: 0.0})


def _weighted_sampler(multi: Path, **kwargs) -> DistributedBatchSampler:
    weights = {0.5: 1.0, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0}
    return DistributedBatchSampler.from_store(PatchStore(multi), batch_size=8, seed=3,
                                              mpp_weights=weights, **kwargs)  # fmt: skip


def test_weighted_sampling_is_deterministic_per_seed_and_epoch(multi: Path) -> None:
    store = PatchStore(multi)
    a, b = _weighted_sampler(multi), _weighted_sampler(multi)
    np.testing.assert_array_equal(a.epoch_order(0), b.epoch_order(0))
    assert not np.array_equal(np.sort(a.epoch_order(0)), np.sort(a.epoch_order(1)))
    shares = np.bincount(np.rint(np.log2(store.tiles["mpp"][a.epoch_order(2)] / 0.499)).astype(int))
    assert shares.max() - shares.min() <= 1  # equal weights: equal counts per magnification
    module = PatchDataModule(stores=[str(multi)], views=TwoViews(output_size=32), batch_size=8,
                             num_workers=0, pin_memory=False, seed=3,
                             mpp_weights={0.5: 1.0, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0})  # fmt: skip
    module.setup("fit")
    np.testing.assert_array_equal(module.make_sampler(0, 1).epoch_order(5), a.epoch_order(5))
