"""The node-local table cache on shared systems: private default, any OSError falls back to
memory with one warning, no flock needed, dead builds cleaned, LRU eviction under a size cap."""

from __future__ import annotations

import errno
import os
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scratchpath.store import PatchStore, cache, merge
from scratchpath.store import table as tbl
from store_helpers import write_store


@pytest.fixture(scope="module")
def real_tiles(tiles_dir: Path) -> np.ndarray:
    files = sorted((tiles_dir / "deeptexture_examples_unlabeled_256" / "unlabeled").iterdir())
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[:8]])


@pytest.fixture
def two_stores(tmp_path: Path, real_tiles: np.ndarray, monkeypatch) -> list[Path]:
    paths = [tmp_path / "a.zarr", tmp_path / "b.zarr"]
    for path in paths:
        write_store(path, real_tiles, slides=2)
    monkeypatch.setattr(tbl, "IN_MEMORY_TILES", 0)  # merge these small stores through the cache
    return paths


def _expected_slides() -> list[int]:
    return np.repeat(np.arange(4), 4).tolist()


def test_the_default_cache_is_node_local_and_private(tmp_path, two_stores, monkeypatch) -> None:
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node-local"))
    root = cache.cache_root()
    assert root == tmp_path / "node-local" / f"scratchpath-{os.getuid()}"
    both = PatchStore(*two_stores)
    assert Path(both.tiles["x"].filename).parent.parent == root
    assert root.stat().st_mode & 0o777 == 0o700


def _failing_open(error: int):
    """``open`` whose files fail their second write with ``error`` (a disk filling up)."""
    import builtins

    class Failing:
        def __init__(self, *args, **kwargs) -> None:
            self._file = builtins.open(*args, **kwargs)  # noqa: SIM115
            self._writes = 0

        def write(self, data) -> int:
            self._writes += 1
            if self._writes > 1:
                raise OSError(error, os.strerror(error))
            return self._file.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self._file.close()

    return Failing


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_any_oserror_falls_back_to_memory_with_one_warning(
    tmp_path, two_stores, monkeypatch, error
) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    if error == errno.EROFS:  # a read-only cache: creating anything fails at once

        def read_only(self, *args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(Path, "mkdir", read_only)
    else:  # quota or disk full half-way through writing the merged columns
        monkeypatch.setattr(merge, "open", _failing_open(error), raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        both = PatchStore(*two_stores)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "building it in memory instead" in messages[0]
    assert os.strerror(error) in messages[0]
    assert not isinstance(both.tiles["x"], np.memmap)
    assert both.tiles["slide_index"].tolist() == _expected_slides()
    left = list((tmp_path / "cache").iterdir()) if (tmp_path / "cache").exists() else []
    assert not [p for p in left if p.name.endswith(".building") or (p / "x.bin").exists()]


def test_without_flock_the_entry_is_still_built_and_shared(tmp_path, two_stores, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "no locks on this mount")

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(cache.fcntl, "flock", no_locks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the lock only saves duplicate work
        first, second = PatchStore(*two_stores), PatchStore(*two_stores)
    assert isinstance(first.tiles["x"], np.memmap)
    assert first.tiles["x"].filename == second.tiles["x"].filename
    assert first.tiles["slide_index"].tolist() == _expected_slides()


def test_dead_builds_are_cleaned_and_live_ones_kept(tmp_path, two_stores, monkeypatch) -> None:
    root = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(root))
    root.mkdir(mode=0o700)
    host = socket.gethostname()
    dead_pid = root / f".k1.999999999@{host}.building"  # a build killed on this node
    old_elsewhere = root / ".k2.12@other-node.building"  # another node's, two days old
    live = root / f".k3.{os.getpid()}@{host}.building"  # a build in progress
    for folder in (dead_pid, old_elsewhere, live):
        folder.mkdir()
        (folder / "x.bin").write_bytes(b"\0" * 64)
    two_days_ago = time.time() - 2 * 86400
    os.utime(old_elsewhere, (two_days_ago, two_days_ago))
    PatchStore(*two_stores)
    assert not dead_pid.exists() and not old_elsewhere.exists() and live.exists()


def test_old_entries_are_evicted_least_recently_used_under_the_cap(tmp_path, monkeypatch) -> None:
    root = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(root))
    monkeypatch.setenv(cache.SIZE_ENV, str(250_000 / 2**30))  # room for two 100 kB entries

    def entry(name: str) -> Path:
        def build(folder: Path) -> None:
            (folder / "x.bin").write_bytes(np.full(100_000, ord(name[-1]), np.uint8).tobytes())

        return cache.cached(name, build)

    first = entry("e1")
    mapped = np.memmap(first / "x.bin", np.uint8, "r")  # a process still reading e1
    time.sleep(0.01)
    entry("e2")
    time.sleep(0.01)
    entry("e3")  # over the cap: e1, the least recently used, goes
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["e2", "e3"]
    assert int(mapped[12345]) == ord("1")  # unlinked, not truncated: still readable
    time.sleep(0.01)
    entry("e2")  # used again: now e3 is the oldest
    time.sleep(0.01)
    entry("e4")
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["e2", "e4"]


def test_a_cache_folder_of_another_user_is_not_used(tmp_path, two_stores, monkeypatch) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    uid = os.getuid()
    monkeypatch.setattr(cache.os, "getuid", lambda: uid + 4242)  # we are someone else
    with pytest.warns(UserWarning, match="owned by another user"):
        both = PatchStore(*two_stores)
    assert both.tiles["slide_index"].tolist() == _expected_slides()
