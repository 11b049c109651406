"""The zarr patch store: round trips, zarr compatibility, crash safety, concatenation."""

from __future__ import annotations

import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from scratchpath.errors import ScratchpathError
from scratchpath.store import STORE_FORMAT_VERSION, PatchStore, StoreWriter
from store_helpers import TILE, psnr_db, write_store


def _load_real_tiles(tiles_dir: Path, n: int) -> np.ndarray:
    files = sorted((tiles_dir / "deeptexture_examples_unlabeled_256" / "unlabeled").iterdir())
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[:n]])


@pytest.fixture(scope="module")
def real_tiles(tiles_dir: Path) -> np.ndarray:
    return _load_real_tiles(tiles_dir, 24)


@pytest.mark.parametrize("codec", ["zstd", "webp"])
def test_lossless_codecs_round_trip_exactly(tmp_path, real_tiles, codec):
    write_store(tmp_path / "s.zarr", real_tiles, codec)
    store = PatchStore(tmp_path / "s.zarr")
    assert len(store) == len(real_tiles)
    np.testing.assert_array_equal(store.read(np.arange(len(store))), real_tiles)


def test_jpeg_round_trip_psnr_at_least_35db(tmp_path, real_tiles):
    write_store(tmp_path / "s.zarr", real_tiles, "jpeg:90")
    decoded = PatchStore(tmp_path / "s.zarr").read(np.arange(len(real_tiles)))
    assert min(psnr_db(d, t) for d, t in zip(decoded, real_tiles, strict=True)) >= 35.0


def test_random_order_read_equals_sequential(tmp_path, real_tiles):
    write_store(tmp_path / "s.zarr", real_tiles, "jpeg:90", slides=3)
    store = PatchStore(tmp_path / "s.zarr")
    sequential = np.stack([store[i] for i in range(len(store))])
    order = np.random.default_rng(0).permutation(len(store))
    np.testing.assert_array_equal(store.read(order), sequential[order])
    np.testing.assert_array_equal(store.read([3, 3, -1]), sequential[[3, 3, -1]])


@pytest.mark.parametrize("codec", ["jpeg:90", "zstd", "webp"])
def test_zarr_itself_reads_the_same_tile(tmp_path, real_tiles, codec):
    write_store(tmp_path / "s.zarr", real_tiles, codec)
    store = PatchStore(tmp_path / "s.zarr")  # registers scratchpath's zarr codecs
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    assert group.attrs["scratchpath_format_version"] == STORE_FORMAT_VERSION
    for i in (0, 13, len(store) - 1):
        _, row = store.zarr_row(i)
        np.testing.assert_array_equal(group["tiles"][row], store[i])


def test_tables_hold_the_written_columns(tmp_path, real_tiles):
    write_store(tmp_path / "s.zarr", real_tiles, "zstd")
    store = PatchStore(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store.tiles["x"], np.arange(24) * 10)
    np.testing.assert_array_equal(store.tiles["slide_index"], [0] * 12 + [1] * 12)
    # Groups are int32 codes into a small dictionary (code 0: no group), not strings per tile.
    assert store.tiles["group"].dtype == np.int32 and store.group_names == ["", "g0", "g1"]
    assert list(store.tile_column("group")[[0, 23]]) == ["g0", "g1"]
    assert store.mpp == 0.5 and store.labels is None and store.class_names == []
    assert [s["n_tiles"] for s in store.slides] == [12, 12]
    assert {s["status"] for s in store.slides} == {"ok"}
    # Slides start on fresh shards: 12 tiles in shards of 8 -> shards 0, 1 | 2, 3.
    np.testing.assert_array_equal(np.unique(store.chunk_ids), [0, 1, 2, 3])


def test_tiles_encoded_elsewhere_are_stored_as_given(tmp_path, real_tiles):
    # Ingest workers encode tiles with a pickled copy of the writer's codec.
    with StoreWriter(tmp_path / "s.zarr", tile_size=TILE, codec="jpeg:80") as writer:
        codec = pickle.loads(pickle.dumps(writer.codec))
        blobs = [codec.encode(tile) for tile in real_tiles[:5]]
        with writer.begin_slide({"source": "a", "slide_id": "a", "sha256": "a"}) as slide:
            slide.add_encoded(blobs, tissue_fraction=np.linspace(0.5, 1, 5))
    store = PatchStore(tmp_path / "s.zarr")
    assert [store.read_encoded(i) for i in range(5)] == blobs
    np.testing.assert_allclose(store.tiles["tissue_fraction"], np.linspace(0.5, 1, 5))


def test_newer_format_version_is_refused(tmp_path, real_tiles):
    write_store(tmp_path / "s.zarr", real_tiles[:4], "zstd", slides=1)
    meta_path = tmp_path / "s.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["scratchpath_format_version"] = STORE_FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ScratchpathError, match="newer than this scratchpath reads"):
        PatchStore(tmp_path / "s.zarr")


@pytest.mark.parametrize("kind", ["missing", "empty folder", "plain zarr group", "file"])
def test_non_store_path_gives_one_line_error(tmp_path, kind):
    path = tmp_path / "x"
    if kind == "empty folder":
        path.mkdir()
    elif kind == "plain zarr group":
        zarr.open_group(path, mode="w")
    elif kind == "file":
        path.write_text("hello")
    with pytest.raises(ScratchpathError, match="not a scratchpath store") as err:
        PatchStore(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_file_memory_and_zip_urls_open_the_same_store(tmp_path, real_tiles):
    import fsspec

    write_store(tmp_path / "s.zarr", real_tiles[:10], "zstd", slides=1)
    local = PatchStore(tmp_path / "s.zarr")
    via_file = PatchStore(f"file://{tmp_path / 's.zarr'}")
    memory = fsspec.filesystem("memory")
    memory.put(str(tmp_path / "s.zarr"), "/copy.zarr", recursive=True)
    via_memory = PatchStore("memory://copy.zarr")
    shutil.make_archive(str(tmp_path / "s"), "zip", tmp_path, "s.zarr")
    via_zip = PatchStore(f"zip://s.zarr::file://{tmp_path / 's.zip'}")
    for other in (via_file, via_memory, via_zip):
        assert other.fingerprint == local.fingerprint
        np.testing.assert_array_equal(other.read([9, 2]), local.read([9, 2]))


def test_concatenated_stores_read_as_one(tmp_path, real_tiles):
    write_store(tmp_path / "a.zarr", real_tiles[:10], "zstd", slides=2)
    write_store(tmp_path / "b.zarr", real_tiles[10:], "jpeg:90", slides=1)
    both = PatchStore(tmp_path / "a.zarr", tmp_path / "b.zarr")
    b = PatchStore(tmp_path / "b.zarr")
    assert len(both) == 24 and len(both.slides) == 3
    np.testing.assert_array_equal(both.read([0, 10, 23]), [real_tiles[0], b[0], b[13]])
    np.testing.assert_array_equal(both.tiles["slide_index"][[0, 9, 10]], [0, 1, 2])
    assert [s["slide_index"] for s in both.slides] == [0, 1, 2]
    assert set(both.chunk_ids[:10]).isdisjoint(both.chunk_ids[10:])
    assert both.codec == "mixed"


def test_concatenation_with_other_class_names_is_refused(tmp_path, real_tiles):
    names = ["tumour", "stroma"]
    write_store(tmp_path / "a.zarr", real_tiles[:4], "zstd", slides=1, class_names=names)
    write_store(tmp_path / "b.zarr", real_tiles[:4], "zstd", slides=1, class_names=["tumour"])
    with pytest.raises(ScratchpathError, match="class_names"):
        PatchStore(tmp_path / "a.zarr", tmp_path / "b.zarr")


def test_pickled_store_reopens_by_path(tmp_path, real_tiles):
    write_store(tmp_path / "s.zarr", real_tiles, "zstd")
    store = PatchStore(tmp_path / "s.zarr")
    store.read([0])  # opens file handles, which must not travel
    blob = pickle.dumps(store)
    assert len(blob) < 500
    np.testing.assert_array_equal(pickle.loads(blob).read([5, 1]), real_tiles[[5, 1]])


def test_store_reads_in_a_forked_worker_after_the_parent_read(tmp_path, real_tiles):
    """As in a forked DataLoader worker: the child inherits the store object (not a pickled
    copy) with the parent's open shard files, and reads through its own."""
    write_store(tmp_path / "s.zarr", real_tiles, "zstd")
    store = PatchStore(tmp_path / "s.zarr")
    store.read([0, 20])  # the parent holds open shard files when the worker forks
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.write(write_end, store.read([20, 0, 7]).tobytes())
        finally:
            os._exit(0)
    os.close(write_end)
    expected = real_tiles[[20, 0, 7]]
    received = b""
    try:
        while len(received) < expected.nbytes:
            ready, _, _ = select.select([read_end], [], [], 60)
            assert ready, "the forked reader sent nothing for 60 s"
            chunk = os.read(read_end, 1 << 20)
            assert chunk, "the forked reader exited early"
            received += chunk
    finally:
        os.close(read_end)
        os.kill(pid, signal.SIGKILL)  # bounded whatever happened in the child
        os.waitpid(pid, 0)
    got = np.frombuffer(received, np.uint8).reshape(expected.shape)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(store.read([7]), real_tiles[[7]])


def test_fingerprint_changes_with_content_only(tmp_path, real_tiles):
    write_store(tmp_path / "a.zarr", real_tiles, "zstd")
    write_store(tmp_path / "b.zarr", real_tiles, "zstd")
    write_store(tmp_path / "c.zarr", real_tiles, "zstd", slides=3)
    fingerprints = [PatchStore(tmp_path / f"{n}.zarr").fingerprint for n in "abc"]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_reopening_with_another_tile_size_is_refused(tmp_path, real_tiles):
    write_store(tmp_path / "s.zarr", real_tiles[:4], "zstd", slides=1)
    with pytest.raises(ScratchpathError, match="tile_size"):
        StoreWriter(tmp_path / "s.zarr", tile_size=224, codec="zstd")


def test_second_writer_is_refused(tmp_path):
    with (
        StoreWriter(tmp_path / "s.zarr", tile_size=TILE),
        pytest.raises(ScratchpathError, match="another process is writing"),
    ):
        StoreWriter(tmp_path / "s.zarr", tile_size=TILE)


def test_aborted_and_failed_slides_add_no_tiles(tmp_path, real_tiles):
    with StoreWriter(tmp_path / "s.zarr", tile_size=TILE, codec="zstd", shard_size=8) as writer:
        slide = writer.begin_slide({"source": "a", "slide_id": "a", "sha256": "a"})
        slide.add(real_tiles[:10])
        slide.abort()
        writer.record_failure({"source": "b.svs", "slide_id": "b", "sha256": "b"}, "not a TIFF")
        with writer.begin_slide({"source": "c", "slide_id": "c", "sha256": "c"}) as slide:
            slide.add(real_tiles[:3])
        assert writer.is_complete("c") and not writer.is_complete("a")
    store = PatchStore(tmp_path / "s.zarr")
    assert len(store) == 3
    assert [(s["slide_id"], s["status"], s["reason"]) for s in store.slides] == [
        ("b", "failed", "not a TIFF"),
        ("c", "ok", ""),
    ]
    np.testing.assert_array_equal(store.read([0, 1, 2]), real_tiles[:3])
    assert store.tiles["slide_index"].tolist() == [1, 1, 1]


_CHILD = textwrap.dedent(
    """
    import numpy as np
    from scratchpath.store import StoreWriter
    tiles = np.load({tiles!r})
    print("start", flush=True)
    with StoreWriter({store!r}, tile_size=256, codec="zstd", shard_size=8) as writer:
        for k in range(4):
            if writer.is_complete(f"sha{{k}}"):
                continue
            record = {{"source": "s", "slide_id": f"s{{k}}", "sha256": f"sha{{k}}"}}
            with writer.begin_slide(record) as slide:
                for start in range(0, 20, 5):
                    part = np.roll(tiles, k, axis=0)[start : start + 5]
                    slide.add(part, x=np.arange(start, start + 5))
            print("committed", k, flush=True)
    """
)


def _check_consistent(path: Path, real_tiles: np.ndarray) -> int:
    store = PatchStore(path)
    shas = [s["sha256"] for s in store.slides]
    assert len(shas) == len(set(shas)), "a slide was committed twice"
    for slide in store.slides:
        k = int(slide["sha256"][3:])
        rows = np.flatnonzero(store.tiles["slide_index"] == slide["slide_index"])
        assert len(rows) == slide["n_tiles"] == 20
        np.testing.assert_array_equal(store.tiles["x"][rows], np.arange(20))
        np.testing.assert_array_equal(store.read(rows), np.roll(real_tiles, k, axis=0)[:20])
    return len(store.slides)


def test_kill_9_mid_write_leaves_complete_slides_and_resumes(tmp_path, real_tiles):
    path = tmp_path / "s.zarr"
    np.save(tmp_path / "tiles.npy", real_tiles)
    code = _CHILD.format(tiles=str(tmp_path / "tiles.npy"), store=str(path))
    rng = np.random.default_rng(0)
    kills = 0
    for attempt in range(6):
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        target = attempt % 3  # kill after 0, 1 or 2 commits of this run, a random delay later
        seen = 0
        for line in child.stdout:
            seen += line.startswith("committed")
            if seen >= target:
                break
        if child.poll() is None:
            subprocess.run(["sleep", f"{rng.uniform(0, 0.05):.3f}"], check=True)
            child.send_signal(signal.SIGKILL)
            kills += child.wait() == -signal.SIGKILL
        else:
            child.wait()
        child.stdout.close()
        if path.exists() and (path / "zarr.json").exists():
            committed = _check_consistent(path, real_tiles)
            if committed == 4 and child.returncode == 0:
                break
    assert kills >= 2, "the child was never killed mid-write"
    final = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert _check_consistent(path, real_tiles) == 4
    assert len(PatchStore(path)) == 80
