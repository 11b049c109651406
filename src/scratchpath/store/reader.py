"""Reading patch stores: the tables in memory, tiles decoded straight from the shard files.

``read`` looks up each tile's (offset, nbytes) in its shard's index (read once per shard and
checked against its crc32c), fetches the bytes with one ``os.pread`` and decodes them with
imagecodecs into the output batch. That skips zarr-python's per-call machinery, which costs
more than decoding a JPEG tile (``benchmarks/bench_store_read.py`` prints both).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from functools import cached_property

import numpy as np

from scratchpath.errors import ScratchpathError
from scratchpath.store import layout
from scratchpath.store.codecs import TileCodec, register_zarr_codecs

# Open shard files kept per process (far below the usual 1024 descriptors per process).
_MAX_OPEN_SHARDS = 128


class _OneStore:
    """One store folder/URL: attributes, committed tables and a per-process shard cache."""

    def __init__(self, path_or_url: str | os.PathLike) -> None:
        self.loc = layout.Location.parse(path_or_url)
        self.attrs = layout.read_group_attrs(self.loc)
        try:
            self.tile_size = int(self.attrs["tile_size"])
            self.shard_size = int(self.attrs["shard_size"])
            self.codec = TileCodec.parse(str(self.attrs["codec"]), self.tile_size)
        except (KeyError, ValueError, ScratchpathError) as err:
            raise ScratchpathError(f"{self.loc.url}: bad store attributes ({err})") from None
        self.class_names = [str(c) for c in self.attrs.get("class_names", [])]
        self.format_version = int(self.attrs[layout.VERSION_KEY])
        self.tables = layout.read_tables(self.loc)
        self._pid = -1  # per-process state (file handles, shard indexes) is made on first read

    def _reset_if_forked(self) -> None:
        # File descriptors are per process: a DataLoader worker opens its own.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._fds: OrderedDict[int, int] = OrderedDict()  # LRU of open shard files
            n_shards = -(-self.tables.end_row // self.shard_size)
            self._entries = np.zeros((n_shards * self.shard_size, 2), np.uint64)  # per row
            self._loaded = np.zeros(n_shards, bool)

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        path = self.loc.local / layout.shard_key(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ScratchpathError(f"{path}: shard missing (store damaged)") from None
        self._fds[shard] = fd
        if len(self._fds) > _MAX_OPEN_SHARDS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _load_index(self, shard: int) -> None:
        """Read shard ``shard``'s (offset, nbytes) index into the per-row lookup table."""
        key = layout.shard_key(shard)
        tail = self.shard_size * 16 + 4
        if self.loc.local is not None:
            fd = self._fd(shard)
            size = os.fstat(fd).st_size
            data = os.pread(fd, tail, size - tail) if size >= tail else b""
        else:
            size = self.loc.size(key)
            data = self.loc.read_range(key, size - tail, size) if size >= tail else b""
        index = layout.parse_shard_index(data, self.shard_size, f"{self.loc.url}/{key}")
        self._entries[shard * self.shard_size : (shard + 1) * self.shard_size] = index
        self._loaded[shard] = True

    def _lookup(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), 2) uint64 (offset, nbytes), loading shard indexes on first use."""
        self._reset_if_forked()
        shards = rows // self.shard_size
        for shard in np.unique(shards[~self._loaded[shards]]).tolist():
            self._load_index(shard)
        entries = self._entries[rows]
        if (entries[:, 1] == layout.EMPTY).any():
            raise ScratchpathError(f"{self.loc.url}: tile rows missing (store damaged)")
        return entries

    def read_blob(self, row: int) -> bytes:
        """The encoded bytes of the tile at ``row``."""
        offset, nbytes = self._lookup(np.array([row], np.int64))[0].tolist()
        shard = row // self.shard_size
        if self.loc.local is not None:
            return os.pread(self._fd(shard), nbytes, offset)
        return self.loc.read_range(layout.shard_key(shard), offset, offset + nbytes)

    def read_blobs(self, rows: np.ndarray) -> list[bytes]:
        """The encoded bytes of the tiles at ``rows``, in that order."""
        entries = self._lookup(rows)
        if self.loc.local is None:
            return [self.read_blob(row) for row in rows.tolist()]
        fd_of, pread, shard_size = self._fd, os.pread, self.shard_size
        return [
            pread(fd_of(row // shard_size), nbytes, offset)
            for row, (offset, nbytes) in zip(rows.tolist(), entries.tolist(), strict=True)
        ]

    def decode_rows(self, rows: np.ndarray, out: np.ndarray, where: np.ndarray) -> None:
        """Decode the tiles at ``rows`` into ``out[where]``."""
        entries = self._lookup(rows)
        decode = self.codec.decode
        if self.loc.local is None:
            for j, row in zip(where.tolist(), rows.tolist(), strict=True):
                decode(self.read_blob(row), out=out[j])
            return
        fd_of, pread, shard_size = self._fd, os.pread, self.shard_size
        for j, row, (offset, nbytes) in zip(
            where.tolist(), rows.tolist(), entries.tolist(), strict=True
        ):
            decode(pread(fd_of(row // shard_size), nbytes, offset), out=out[j])

    def storage_bytes(self) -> int:
        """Bytes of the committed tiles (shard payloads, without the shard indexes)."""
        return int(self._lookup(self.tables.rows)[:, 1].sum())

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._pid = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class PatchStore:
    """Tiles and their tables from one or several zarr v3 patch stores, opened as one dataset.

    ``PatchStore(a, b)`` concatenates stores (e.g. one per SLURM array task): tiles of ``a``
    first, slide indices of ``b`` shifted past ``a``'s slides. Tile sizes and class names must
    agree. Paths may be folders or fsspec URLs (``file://``, ``memory://``, ``zip::...``).

    Attributes:
        tile_size: tile edge in pixels.
        mpp: µm per pixel of the tiles (their median if all lie within 1%), or None if
            unknown or mixed.
        tiles: per-tile columns (slide_index, x, y, level, mpp, tissue_fraction, label, group),
            x/y in level-0 pixels of the slide; label -1 and group "" when absent.
        slides: per-slide records (source, slide_id, bytes, sha256, vendor, width, height, mpp,
            status "ok"/"failed", reason, n_tiles; plus slide_index, row_start).
        labels: int64 label per tile, or None for an unlabelled store.
        class_names: label names (empty for unlabelled).
        chunk_ids: per tile, a global id of the shard holding it (for shard-order shuffling).
        fingerprint: sha256 (16 hex digits) of the codec, tile size, slide and tile tables.
        paths: the paths or URLs opened.
        codec: codec name (e.g. ``"jpeg:90"``), or ``"mixed"``.
        format_version: the stores' format version (the lowest of several).

    A PatchStore pickles by path, so DataLoader workers reopen it and read through their own
    file handles.
    """

    def __init__(self, *paths_or_urls: str | os.PathLike) -> None:
        if not paths_or_urls:
            raise ScratchpathError("PatchStore: give at least one store path")
        register_zarr_codecs()
        self.paths = [os.fspath(p) for p in paths_or_urls]
        self._stores = [_OneStore(p) for p in self.paths]
        first = self._stores[0]
        for other in self._stores[1:]:
            if other.tile_size != first.tile_size:
                raise ScratchpathError(
                    f"{other.loc.url}: tile_size {other.tile_size} differs from "
                    f"{first.tile_size} of {first.loc.url}"
                )
            if other.class_names != first.class_names:
                raise ScratchpathError(
                    f"{other.loc.url}: class_names {other.class_names} differ from "
                    f"{first.class_names} of {first.loc.url}"
                )
        self.tile_size = first.tile_size
        self.class_names = list(first.class_names)
        codecs = {s.codec.name for s in self._stores}
        self.codec = codecs.pop() if len(codecs) == 1 else "mixed"
        self.format_version = min(s.format_version for s in self._stores)
        self._concatenate()

    def _concatenate(self) -> None:
        columns: dict[str, list[np.ndarray]] = {k: [] for k in layout.TILE_COLUMNS}
        store_of, rows, chunk_ids, slides = [], [], [], []
        shard_offset = 0
        for i, store in enumerate(self._stores):
            t = store.tables
            first_slide = len(slides)
            for key in columns:
                col = t.columns[key]
                columns[key].append(col + first_slide if key == "slide_index" else col)
            slides.extend([{**s, "slide_index": s["slide_index"] + first_slide} for s in t.slides])
            store_of.append(np.full(len(t.rows), i, np.int32))
            rows.append(t.rows)
            shard = t.rows // store.shard_size
            chunk_ids.append(shard + shard_offset)
            shard_offset += int(shard.max()) + 1 if len(shard) else 0
        self.tiles = {k: np.concatenate(v) for k, v in columns.items()}
        self.slides = slides
        self._store_of = np.concatenate(store_of)
        self._rows = np.concatenate(rows)
        self.chunk_ids = np.concatenate(chunk_ids).astype(np.int64)
        self.labels = self.tiles["label"] if self.class_names else None
        self.mpp = _common_mpp(self.tiles["mpp"])

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> np.ndarray:
        """Tile ``i`` as (H, W, 3) uint8 RGB."""
        return self.read([i])[0]

    def _indices(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"tile index out of range for a store of {n} tiles")
        return np.where(idx < 0, idx + n, idx)

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Tiles at ``indices`` (any order, repeats allowed) as (N, H, W, 3) uint8 RGB."""
        idx = self._indices(indices)
        t = self.tile_size
        out = np.empty((len(idx), t, t, 3), np.uint8)
        store_ids = self._store_of[idx]
        for s, store in enumerate(self._stores):
            where = np.flatnonzero(store_ids == s) if len(self._stores) > 1 else np.arange(len(idx))
            if len(where):
                store.decode_rows(self._rows[idx[where]], out, where)
        return out

    def read_encoded_batch(self, indices: Sequence[int] | np.ndarray) -> list[bytes]:
        """The stored (encoded, not decoded) bytes of the tiles at ``indices``, in that order.

        What a data-loader worker hands to the training device when it decodes there (JPEG
        stores: ``torchvision.io.decode_jpeg`` on the GPU); decode each with the store's codec.
        """
        idx = self._indices(indices)
        blobs: list[bytes] = [b""] * len(idx)
        store_ids = self._store_of[idx]
        for s, store in enumerate(self._stores):
            where = np.flatnonzero(store_ids == s) if len(self._stores) > 1 else np.arange(len(idx))
            if len(where):
                read = store.read_blobs(self._rows[idx[where]])
                for j, blob in zip(where.tolist(), read, strict=True):
                    blobs[j] = blob
        return blobs

    def read_encoded(self, i: int) -> bytes:
        """The stored bytes of tile ``i`` (for copying tiles between stores without re-encoding)."""
        store = self._stores[int(self._store_of[i])]
        return store.read_blob(int(self._rows[i]))

    @cached_property
    def fingerprint(self) -> str:
        """Stable content hash: codec, tile size, slide table and tile table of every store."""
        h = hashlib.sha256()
        for store in self._stores:
            t = store.tables
            h.update(f"{store.codec.name}|{store.tile_size}|{store.class_names}".encode())
            h.update(json.dumps(t.slides, sort_keys=True).encode())
            for key in layout.TILE_COLUMNS:
                col = t.columns[key]
                data = "\0".join(col.tolist()).encode() if col.dtype.kind == "U" else col.tobytes()
                h.update(data)
            h.update(t.rows.tobytes())
        return h.hexdigest()[:16]

    def storage_bytes(self) -> int:
        """Bytes the encoded tiles take (all stores)."""
        return sum(s.storage_bytes() for s in self._stores)

    def zarr_row(self, i: int) -> tuple[str, int]:
        """(store path or URL, row of tile ``i`` in that store's zarr array ``tiles``)."""
        return self.paths[int(self._store_of[i])], int(self._rows[i])

    def close(self) -> None:
        """Close file handles (reopened on the next read)."""
        for store in self._stores:
            store.close()

    def __enter__(self) -> PatchStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"paths": self.paths}

    def __setstate__(self, state: dict) -> None:
        self.__init__(*state["paths"])

    def __repr__(self) -> str:
        return f"PatchStore({', '.join(map(repr, self.paths))}: {len(self)} tiles)"


def _common_mpp(mpp: np.ndarray) -> float | None:
    """The tiles' µm/px if all are known and within 1% of each other, else None (mixed)."""
    if len(mpp) == 0 or not np.isfinite(mpp).all():
        return None
    low, high, median = float(mpp.min()), float(mpp.max()), float(np.median(mpp))
    return median if high - low <= 0.01 * median else None
