"""Store format 2 at scale: faithful JPEG, memory-mapped tables, old stores, batched remote reads,
crash tails, and the blocked tile-mode permutation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from scratchpath.data.sampling import DistributedBatchSampler
from scratchpath.errors import ScratchpathError
from scratchpath.store import PatchStore, StoreWriter, TileCodec, layout
from scratchpath.store import table as tbl
from store_helpers import TILE, psnr_db, write_store


@pytest.fixture(scope="module")
def real_tiles(tiles_dir: Path) -> np.ndarray:
    files = sorted((tiles_dir / "deeptexture_examples_unlabeled_256" / "unlabeled").iterdir())
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[:24]])


def _to_format_1(path: Path) -> None:
    """Rewrite a format-2 store as format 1 wrote it (npz segment; JPEG named without its
    4:2:0 subsampling), to check that old stores still open and migrate."""
    store = PatchStore(path)
    rows = np.concatenate(
        [np.arange(s["row_start"], s["row_start"] + s["n_tiles"]) for s in store.slides]
    ).astype(np.int64)
    columns = {k: np.asarray(store.tiles[k]) for k in layout.TILE_COLUMNS if k != "group"}
    columns["group"] = store.tile_column("group")
    arrays = layout.encode_segment(store.slides, columns, rows)
    np.savez(path / "tables" / layout.segment_name(0, len(store.slides)), **arrays)
    (path / "tables" / tbl.SLIDES_FILE).unlink()
    for f in (path / "tables" / tbl.TILE_FOLDER).iterdir():
        f.unlink()
    (path / "tables" / tbl.TILE_FOLDER).rmdir()
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["scratchpath_format_version"] = 1
    meta["attributes"]["codec"] = meta["attributes"]["codec"].replace(":420", "")
    (path / "zarr.json").write_text(json.dumps(meta))
    array_meta = json.loads((path / "tiles" / "zarr.json").read_text())
    for codec in array_meta["codecs"]:
        for inner in codec.get("configuration", {}).get("codecs", []):
            inner.get("configuration", {}).pop("subsampling", None)
    (path / "tiles" / "zarr.json").write_text(json.dumps(array_meta))


# -- codec ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def svs_tiles(slides_dir: Path) -> np.ndarray:
    """16 level-0 tiles of the real CMU-1 SVS as tifffile decodes them (full-chroma pixels)."""
    import tifffile

    with tifffile.TiffFile(slides_dir / "CMU-1-Small-Region.svs") as tif:
        region = tif.pages[0].asarray()[512 : 512 + 4 * TILE, 512 : 512 + 4 * TILE, :3]
    return region.reshape(4, TILE, 4, TILE, 3).transpose(0, 2, 1, 3, 4).reshape(16, TILE, TILE, 3)


def test_default_jpeg_keeps_full_chroma_and_records_it(tmp_path, svs_tiles):
    assert TileCodec.parse("jpeg", TILE).name == "jpeg:90:444"
    assert TileCodec.parse("jpeg:85:420", TILE).subsampling == "420"
    with pytest.raises(ScratchpathError, match="subsampling"):
        TileCodec.parse("jpeg:90:411", TILE)
    with pytest.raises(ScratchpathError, match="only JPEG"):
        TileCodec.parse("zstd:3:444", TILE)
    psnr = {}
    for codec in ("jpeg", "jpeg:90:420"):
        write_store(tmp_path / f"{codec}.zarr", svs_tiles, codec)
        store = PatchStore(tmp_path / f"{codec}.zarr")
        decoded = store.read(np.arange(len(store)))
        pairs = zip(decoded, svs_tiles, strict=True)
        psnr[store.codec] = np.mean([psnr_db(d, t) for d, t in pairs])
        group = zarr.open_group(tmp_path / f"{codec}.zarr", mode="r")  # zarr itself decodes too
        np.testing.assert_array_equal(group["tiles"][int(store.zarr_row(5)[1])], decoded[5])
    assert set(psnr) == {"jpeg:90:444", "jpeg:90:420"}
    # On the slide's own pixels chroma subsampling costs several dB (benchmarks/bench_codecs.py).
    assert psnr["jpeg:90:444"] >= 38.0 and psnr["jpeg:90:444"] > psnr["jpeg:90:420"] + 3.0


def test_torchcodec_decodes_444_tiles_like_imagecodecs(tmp_path, real_tiles):
    # TorchCodec decodes the device path's JPEGs (scratchpath.data.decode)
    torch = pytest.importorskip("torch")
    from torchcodec.decoders import decode_jpeg

    write_store(tmp_path / "s.zarr", real_tiles, "jpeg")
    store = PatchStore(tmp_path / "s.zarr")
    blobs = store.read_encoded_batch(np.arange(len(store)))
    ours = store.read(np.arange(len(store)))
    theirs = decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs])
    for a, b in zip(ours, theirs, strict=True):
        diff = np.abs(a.astype(int) - b.permute(1, 2, 0).numpy().astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.05


# -- old stores -------------------------------------------------------------------------------
def test_format_1_store_opens_reads_and_migrates_on_append(tmp_path, real_tiles):
    path = tmp_path / "old.zarr"
    write_store(path, real_tiles[:16], "jpeg:90:420")
    new = PatchStore(path)
    expected, fingerprint = new.read(np.arange(16)), new.fingerprint
    _to_format_1(path)
    old = PatchStore(path)
    assert old.format_version == 1 and old.codec == "jpeg:90:420"
    np.testing.assert_array_equal(old.read(np.arange(16)), expected)
    assert old.fingerprint == fingerprint and old.group_names == ["", "g0", "g1"]
    with pytest.raises(ScratchpathError, match="codec is 'jpeg:90:420' in the store"):
        StoreWriter(path, tile_size=TILE)  # the default 4:4:4 would mix codecs in one store
    with (
        StoreWriter(path, tile_size=TILE, codec="jpeg:90:420", shard_size=8) as writer,
        writer.begin_slide({"source": "c", "slide_id": "c", "sha256": "c"}) as slide,
    ):
        slide.add(real_tiles[16:20], group="g9")
    migrated = PatchStore(path)
    assert migrated.format_version == layout.STORE_FORMAT_VERSION and len(migrated) == 20
    assert not list((path / "tables").glob("seg-*.npz"))
    np.testing.assert_array_equal(migrated.read(np.arange(16)), expected)
    assert migrated.tile_column("group")[[0, 15, 19]].tolist() == ["g0", "g1", "g9"]
    assert migrated.slides[2]["slide_index"] == 2 and migrated.tiles["slide_index"][19] == 2


# -- the memory-mapped table ------------------------------------------------------------------
def test_local_table_is_memory_mapped_and_compact(tmp_path, real_tiles):
    write_store(tmp_path / "s.zarr", real_tiles)
    store = PatchStore(tmp_path / "s.zarr")
    assert all(isinstance(c, np.memmap) for c in store.tiles.values())
    assert sum(c.dtype.itemsize for c in store.tiles.values()) == tbl.BYTES_PER_TILE <= 40
    assert not store.tiles["x"].flags.writeable


def test_merged_table_is_cached_once_and_shared(tmp_path, real_tiles, monkeypatch):
    for name in "abc":
        write_store(tmp_path / f"{name}.zarr", real_tiles[:8], slides=2)
    paths = [tmp_path / f"{n}.zarr" for n in "abc"]
    in_memory = PatchStore(*paths)
    monkeypatch.setattr(tbl, "IN_MEMORY_TILES", 0)
    monkeypatch.setenv("SCRATCHPATH_CACHE", str(tmp_path / "cache"))
    cached = PatchStore(*paths)
    assert all(isinstance(c, np.memmap) for c in cached.tiles.values())
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the folder and its lock file
    for key in in_memory.tiles:
        np.testing.assert_array_equal(cached.tiles[key], in_memory.tiles[key])
    assert cached.tiles["slide_index"].tolist() == np.repeat(np.arange(6), 4).tolist()
    np.testing.assert_array_equal(cached.read([0, 9, 23]), in_memory.read([0, 9, 23]))
    assert cached.fingerprint == in_memory.fingerprint
    again = PatchStore(*paths)  # a second process finds the cache: nothing rebuilt
    assert again.tiles["x"].filename == cached.tiles["x"].filename
    with (
        StoreWriter(paths[2], tile_size=TILE, codec="zstd") as writer,  # new content, new key
        writer.begin_slide({"source": "d", "slide_id": "d", "sha256": "d"}) as slide,
    ):
        slide.add(real_tiles[:2])
    assert len(PatchStore(*paths)) == 26 and len(list((tmp_path / "cache").iterdir())) == 4


def test_killed_commit_tails_are_ignored_then_truncated(tmp_path, real_tiles):
    path = tmp_path / "s.zarr"
    write_store(path, real_tiles[:10])
    tables = path / "tables"
    with open(tables / tbl.TILE_FOLDER / "x.bin", "ab") as f:
        f.write(b"\x07" * 40)  # a killed commit wrote columns ...
    with open(tables / tbl.SLIDES_FILE, "ab") as f:
        f.write(b'{"slide": {"slide_id": "tor')  # ... and half its line
    store = PatchStore(path)
    assert len(store) == 10 and len(store.slides) == 2
    with (
        StoreWriter(path, tile_size=TILE, codec="zstd") as writer,
        writer.begin_slide({"source": "c", "slide_id": "c", "sha256": "c"}) as slide,
    ):
        slide.add(real_tiles[10:13], x=[1, 2, 3])
    store = PatchStore(path)
    assert len(store) == 13 and [s["slide_id"] for s in store.slides][-1] == "c"
    assert store.tiles["x"][-3:].tolist() == [1, 2, 3]
    np.testing.assert_array_equal(store.read([12]), real_tiles[[12]])


# -- remote reads -----------------------------------------------------------------------------
def test_remote_batch_costs_one_request_per_shard(tmp_path, real_tiles, monkeypatch):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    write_store(tmp_path / "s.zarr", real_tiles, slides=1)  # 24 tiles in shards of 8: 3 shards
    memory = fsspec.filesystem("memory")
    memory.put(str(tmp_path / "s.zarr"), "/remote.zarr", recursive=True)
    local, remote = PatchStore(tmp_path / "s.zarr"), PatchStore("memory://remote.zarr")
    calls: list[str] = []
    original = MemoryFileSystem.cat_file

    def counting(self, path, *args, **kwargs):
        calls.append(path)
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "cat_file", counting)
    batch = [3, 0, 7, 1, 12, 9, 5]  # shards 0 and 1
    np.testing.assert_array_equal(remote.read(batch), local.read(batch))
    assert len(calls) == 4  # two shard indexes (first use), then one range per shard
    calls.clear()
    assert remote.read_encoded_batch(batch) == local.read_encoded_batch(batch)
    assert len(calls) == 2 and len(set(calls)) == 2
    calls.clear()
    np.testing.assert_array_equal(remote.read(np.arange(24)), real_tiles)
    assert len(calls) == 1 + 3  # the new shard's index, then one range per shard


# -- blocked tile-mode permutation ------------------------------------------------------------
class _Table:
    def __init__(self, n: int) -> None:
        self.tiles = {
            "slide_index": np.arange(n) // 97,
            "tissue_fraction": np.where(np.arange(n) % 11 == 0, 0.1, 0.9).astype(np.float32),
        }
        self.chunk_ids = np.arange(n) // 64

    def __len__(self) -> int:
        return len(self.chunk_ids)


def test_blocked_permutation_is_a_disjoint_deterministic_split(monkeypatch):
    from scratchpath.data import sampling

    monkeypatch.setattr(sampling, "EXACT_SHUFFLE_TILES", 0)  # force the large-store path
    monkeypatch.setattr(sampling, "PERMUTATION_BLOCK", 64)
    table = _Table(20_011)
    pool = np.flatnonzero(table.tiles["tissue_fraction"] >= 0.5)

    def sampler(rank: int, seed: int = 0) -> DistributedBatchSampler:
        return DistributedBatchSampler.from_store(
            table, batch_size=32, rank=rank, world_size=3, seed=seed, min_tissue=0.5
        )

    order = sampler(0).epoch_order(4)
    np.testing.assert_array_equal(np.sort(order), pool)  # a permutation of the pool
    shares = [sampler(r).batches(4) for r in range(3)]
    assert len({s.shape for s in shares}) == 1
    seen = np.concatenate([s.ravel() for s in shares])
    assert len(np.unique(seen)) == len(seen)  # disjoint
    np.testing.assert_array_equal(shares[1], sampler(1).batches(4))  # deterministic
    assert not np.array_equal(order, sampler(0).epoch_order(5))
    assert not np.array_equal(order, sampler(0, seed=1).epoch_order(4))
    # Mixing: a batch of 32 draws from ~28 of the 206 slides (a uniform shuffle: ~29.7).
    slides_per_batch = [len(np.unique(table.tiles["slide_index"][b])) for b in shares[0]]
    assert np.mean(slides_per_batch) > 26


def test_shard_starts_match_the_chunk_ids(tmp_path, real_tiles):
    write_store(tmp_path / "a.zarr", real_tiles[:19], slides=2)  # slides of 10 and 9 in shards of 8
    write_store(tmp_path / "b.zarr", real_tiles[:5], slides=1)
    both = PatchStore(tmp_path / "a.zarr", tmp_path / "b.zarr")
    chunks = both.chunk_ids
    expected = np.flatnonzero(np.r_[True, chunks[1:] != chunks[:-1]])
    np.testing.assert_array_equal(both.shard_starts(), expected)
    assert expected.tolist() == [0, 8, 10, 18, 19]


def test_unwritable_cache_falls_back_to_an_in_memory_merge(tmp_path, real_tiles, monkeypatch):
    for name in "ab":
        write_store(tmp_path / f"{name}.zarr", real_tiles[:8], slides=2)
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setattr(tbl, "IN_MEMORY_TILES", 0)
    monkeypatch.setenv("SCRATCHPATH_CACHE", str(tmp_path / "not-a-folder" / "cache"))
    with pytest.warns(UserWarning, match="in memory"):
        both = PatchStore(tmp_path / "a.zarr", tmp_path / "b.zarr")
    assert both.tiles["slide_index"].tolist() == np.repeat(np.arange(4), 4).tolist()
    np.testing.assert_array_equal(both.read([0, 15]), real_tiles[[0, 7]])
