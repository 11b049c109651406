"""Reading patch stores: memory-mapped tile tables, tiles decoded straight from the shard files.

``read`` looks up each tile's (offset, nbytes) in its shard's index (read once per shard,
checked against its crc32c and kept in a small per-process LRU), fetches the bytes with one
``os.pread`` and decodes them with imagecodecs into the output batch. That skips zarr-python's
per-call machinery, which costs more than decoding a JPEG tile (``benchmarks/bench_store_read.py``
prints both). From a remote (fsspec) store, a batch costs one ranged request per shard it
touches, all issued by one ``fs.cat_ranges`` call (plus one per shard index the first time).

The tile table is never copied per process: a local store's column files are memory-mapped
(DataLoader workers and DDP ranks share the page cache), and several stores opened together are
merged once into a cached columnar file (:mod:`scratchpath.store.table`). What a process holds
privately is O(slides + shards touched), not O(tiles).
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

from scratchpath.errors import DamagedTileError, ScratchpathError
from scratchpath.store import layout
from scratchpath.store import table as tbl
from scratchpath.store.codecs import (
    LEGACY_SUBSAMPLING,
    TileCodec,
    TileDataError,
    register_zarr_codecs,
)

# Open shard files kept per process (far below the usual 1024 descriptors per process).
_MAX_OPEN_SHARDS = 128
# Shard indexes (16 bytes per slot, 16 KiB per 1024-tile shard) kept per process.
_MAX_CACHED_INDEXES = 2048
# Slide-record fields that describe where a file was, not what the store holds.
_NOT_CONTENT = ("fast_id",)


class _OneStore:
    """One store folder/URL: attributes, committed table and a per-process shard cache."""

    def __init__(self, path_or_url: str | os.PathLike) -> None:
        self.loc = layout.Location.parse(path_or_url)
        self.attrs = layout.read_group_attrs(self.loc)
        try:
            self.tile_size = int(self.attrs["tile_size"])
            self.shard_size = int(self.attrs["shard_size"])
            # A stored JPEG name without subsampling is a format-1 store's 4:2:0.
            codec = str(self.attrs["codec"])
            self.codec = TileCodec.parse(codec, self.tile_size, 90, LEGACY_SUBSAMPLING)
        except (KeyError, ValueError, ScratchpathError) as err:
            raise ScratchpathError(f"{self.loc.url}: bad store attributes ({err})") from None
        self.class_names = [str(c) for c in self.attrs.get("class_names", [])]
        self.format_version = int(self.attrs[layout.VERSION_KEY])
        if self.format_version < 2:
            self.table = layout.read_v1_table(self.loc)
        elif self.loc.local is not None:
            self.table = tbl.read_local_table(self.loc.local / layout.TABLES, self.loc.url)
        else:
            self.table = tbl.read_remote_table(self.loc, layout.TABLES)
        self._pid = -1  # per-process state (file handles, shard indexes) is made on first read

    @property
    def identity(self) -> str:
        """What the merged-table cache is keyed by: where the store is and what it committed."""
        where = str(self.loc.local.resolve()) if self.loc.local is not None else self.loc.url
        digests = hashlib.sha256("".join(self.table.digests).encode()).hexdigest()
        return f"{where}|{self.format_version}|{len(self.table.slides)}|{len(self.table)}|{digests}"

    def _reset_if_forked(self) -> None:
        # File descriptors are per process: a DataLoader worker opens its own.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._fds: OrderedDict[int, int] = OrderedDict()  # LRU of open shard files
            self._indexes: OrderedDict[int, np.ndarray] = OrderedDict()  # LRU of shard indexes

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

    def _load_indexes(self, shards: list[int]) -> None:
        """Read the (offset, nbytes) indexes of ``shards`` (remote: one request per shard, all
        in one ``cat_ranges`` call, each a suffix range of the shard file)."""
        tail = self.shard_size * 16 + 4
        if self.loc.local is not None:
            datas = []
            for shard in shards:
                fd = self._fd(shard)
                size = os.fstat(fd).st_size
                datas.append(os.pread(fd, tail, size - tail) if size >= tail else b"")
        else:
            keys = [layout.shard_key(shard) for shard in shards]
            try:
                datas = self.loc.read_ranges(keys, [-tail] * len(keys), [None] * len(keys))
            except FileNotFoundError as err:
                raise ScratchpathError(f"{self.loc.url}: shard missing ({err})") from None
        for shard, data in zip(shards, datas, strict=True):
            where = f"{self.loc.url}/{layout.shard_key(shard)}"
            self._indexes[shard] = layout.parse_shard_index(data, self.shard_size, where)

    def _lookup(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard of each row, (len(rows), 2) uint64 (offset, nbytes)), loading indexes."""
        self._reset_if_forked()
        shards = rows // self.shard_size
        unique = np.unique(shards).tolist()
        missing = [s for s in unique if s not in self._indexes]
        if missing:
            self._load_indexes(missing)
        entries = np.empty((len(rows), 2), np.uint64)
        order = np.argsort(shards, kind="stable")
        bounds = np.searchsorted(shards[order], [*unique, unique[-1] + 1] if unique else [])
        for k, shard in enumerate(unique):
            index = self._indexes[shard]
            self._indexes.move_to_end(shard)
            here = order[bounds[k] : bounds[k + 1]]
            entries[here] = index[rows[here] - shard * self.shard_size]
        while len(self._indexes) > _MAX_CACHED_INDEXES:  # evicted only once this batch is served
            self._indexes.popitem(last=False)
        if (entries[:, 1] == layout.EMPTY).any():
            raise ScratchpathError(f"{self.loc.url}: tile rows missing (store damaged)")
        return shards, entries

    def read_blobs(self, rows: np.ndarray) -> list[bytes]:
        """The encoded bytes of the tiles at ``rows`` (remote: one ranged request per shard)."""
        shards, entries = self._lookup(rows)
        offsets, sizes = entries[:, 0].astype(np.int64), entries[:, 1].astype(np.int64)
        if self.loc.local is not None:
            pread, fd_of = os.pread, self._fd
            return [
                pread(fd_of(shard), size, offset)
                for shard, offset, size in zip(
                    shards.tolist(), offsets.tolist(), sizes.tolist(), strict=True
                )
            ]
        unique, inverse = np.unique(shards, return_inverse=True)
        inverse = inverse.reshape(-1)
        starts = np.full(len(unique), np.iinfo(np.int64).max)
        np.minimum.at(starts, inverse, offsets)
        stops = np.zeros(len(unique), np.int64)
        np.maximum.at(stops, inverse, offsets + sizes)
        keys = [layout.shard_key(s) for s in unique.tolist()]
        try:
            spans = self.loc.read_ranges(keys, starts.tolist(), stops.tolist())
        except FileNotFoundError as err:
            raise ScratchpathError(f"{self.loc.url}: shard missing ({err})") from None
        local = offsets - starts[inverse]
        return [
            spans[k][o : o + n]
            for k, o, n in zip(inverse.tolist(), local.tolist(), sizes.tolist(), strict=True)
        ]

    def decode_rows(self, rows: np.ndarray, out: np.ndarray, where: np.ndarray) -> None:
        """Decode the tiles at ``rows`` into ``out[where]``; a tile whose bytes do not decode
        raises :class:`_UndecodableTileError` naming its slot in ``out``."""
        decode = self.codec.decode
        for j, blob in zip(where.tolist(), self.read_blobs(rows), strict=True):
            try:
                decode(blob, out=out[j])
            except (TileDataError, RuntimeError, ValueError) as err:  # imagecodecs: RuntimeError
                raise _UndecodableTileError(j, _reason(err)) from None

    def tile_place(self, row: int) -> str:
        """Where the tile at ``row`` is stored: ``"<store>, shard <key>, row <row>"``."""
        return f"{self.loc.url}, shard {layout.shard_key(row // self.shard_size)}, row {row}"

    def storage_bytes(self) -> int:
        """Bytes of the committed tiles (shard payloads, without the shard indexes)."""
        t = self.table
        total = 0
        for row_start, n in zip(t.row_start.tolist(), t.n_tiles.tolist(), strict=True):
            for first in range(row_start, row_start + n, self.shard_size):
                rows = np.arange(first, min(first + self.shard_size, row_start + n))
                total += int(self._lookup(rows)[1][:, 1].sum())
        return total

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
    agree. Paths may be folders or fsspec URLs (``file://``, ``memory://``, ``s3://``,
    ``gs://``, ``zip::...``; see the README for reading from object stores).

    Attributes:
        tile_size: tile edge in pixels.
        tiles: per-tile columns, read-only and memory-mapped for large tables (no per-process
            copy): slide_index (int32), x, y (int32, level-0 pixels of the slide), level
            (int16), mpp (float64), tissue_fraction (float32), label (int16, -1 when absent)
            and group (int32 code into ``group_names``; 0 is "", no group).
        group_names: the group dictionary (``group_names[0] == ""``);
            :meth:`tile_column` gives the groups as strings.
        slides: per-slide records (source, slide_id, bytes, sha256, vendor, width, height, mpp,
            status "ok"/"failed", reason, n_tiles; plus slide_index, row_start).
        class_names: label names (empty for unlabelled).
        paths: the paths or URLs opened.
        codec: codec name (e.g. ``"jpeg:90:444"``; ``"jpeg:90:420"`` for a format-1 JPEG
            store), or ``"mixed"``.
        format_version: the stores' format version (the lowest of several).

    ``labels``, ``mpp``, ``chunk_ids`` and ``fingerprint`` are computed on first use. A
    PatchStore pickles by path, so DataLoader workers reopen it (mapping the same table
    pages) and read through their own file handles.
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
        identity = "\n".join(s.identity for s in self._stores)
        merged = tbl.merge_tables([s.table for s in self._stores], identity)
        self.tiles: dict[str, np.ndarray] = merged.columns
        self.group_names: list[str] = merged.groups
        self.slides: list[dict] = merged.slides
        # Per slide (small): which store, its first tile here and its first row in its store.
        counts = [len(s.table.slides) for s in self._stores]
        self._slide_store = np.repeat(np.arange(len(self._stores), dtype=np.int32), counts)
        self._slide_tile_start = merged.tile_start
        self._slide_row_start = merged.row_start
        self._slide_n_tiles = merged.n_tiles
        self._n = len(merged)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> np.ndarray:
        """Tile ``i`` as (H, W, 3) uint8 RGB."""
        return self.read([i])[0]

    def _locate(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(store id, row in that store's tile array) of each tile index (negatives allowed)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"tile index out of range for a store of {n} tiles")
        idx = np.where(idx < 0, idx + n, idx)
        slide = self.tiles["slide_index"][idx].astype(np.int64)
        rows = self._slide_row_start[slide] + (idx - self._slide_tile_start[slide])
        return self._slide_store[slide], rows

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Tiles at ``indices`` (any order, repeats allowed) as (N, H, W, 3) uint8 RGB."""
        store_ids, rows = self._locate(indices)
        t = self.tile_size
        out = np.empty((len(rows), t, t, 3), np.uint8)
        for s, store in enumerate(self._stores):
            where = np.flatnonzero(store_ids == s)
            if len(where):
                try:
                    store.decode_rows(rows[where], out, where)
                except _UndecodableTileError as bad:
                    raise self.damaged_tile(int(np.asarray(indices).reshape(-1)[bad.slot]),
                                            bad.reason) from None  # fmt: skip
        return out

    def damaged_tile(self, i: int, reason: str) -> DamagedTileError:
        """The error that names damaged tile ``i``: its store, shard and row, and ``reason``.

        :meth:`read` raises it; the device-path decoder (:mod:`scratchpath.data.decode`) makes
        the same one, so a damaged tile reads alike on both paths.
        """
        store_ids, rows = self._locate([i])
        place = self._stores[int(store_ids[0])].tile_place(int(rows[0]))
        return DamagedTileError(f"tile {int(i)} ({place}) is damaged: {reason}", int(i))

    def read_encoded(self, i: int) -> bytes:
        """The stored bytes of tile ``i`` (for copying tiles between stores without re-encoding)."""
        return self.read_encoded_batch([i])[0]

    def read_encoded_batch(self, indices: Sequence[int] | np.ndarray) -> list[bytes]:
        """The stored (encoded) bytes of the tiles at ``indices``, in order, undecoded.

        For decoding elsewhere (e.g. TorchCodec's ``decode_jpeg`` on the GPU for a JPEG
        store: ``codec`` tells the format). From a remote store it costs one ranged request per
        shard the batch touches.
        """
        store_ids, rows = self._locate(indices)
        blobs: list[bytes] = [b""] * len(rows)
        for s, store in enumerate(self._stores):
            where = np.flatnonzero(store_ids == s)
            if len(where):
                for j, blob in zip(where.tolist(), store.read_blobs(rows[where]), strict=True):
                    blobs[j] = blob
        return blobs

    def tile_column(self, name: str) -> np.ndarray:
        """The values of tile column ``name``, with ``"group"`` decoded to strings (O(tiles)
        memory: for labelled stores and reports, not for the 10^8-tile training table)."""
        if name == "group":
            return np.asarray(self.group_names, dtype=str)[self.tiles["group"]]
        return self.tiles[name]

    @cached_property
    def labels(self) -> np.ndarray | None:
        """int64 label per tile, or None for an unlabelled store."""
        return self.tiles["label"].astype(np.int64) if self.class_names else None

    @cached_property
    def mpp(self) -> float | None:
        """µm/px of the tiles (their median if all lie within 1%), or None if unknown/mixed."""
        return _common_mpp(self.tiles["mpp"])

    @cached_property
    def chunk_ids(self) -> np.ndarray:
        """Per tile, a global id of the shard holding it (non-decreasing along the table)."""
        shard_size = np.array([s.shard_size for s in self._stores], np.int64)
        n_shards = [-(-s.table.end_row // s.shard_size) for s in self._stores]
        first_shard = np.concatenate([[0], np.cumsum(n_shards)[:-1]]).astype(np.int64)
        size_of = shard_size[self._slide_store]
        row = np.repeat(self._slide_row_start - self._slide_tile_start, self._slide_n_tiles)
        row += np.arange(len(self), dtype=np.int64)
        row //= np.repeat(size_of, self._slide_n_tiles)
        row += np.repeat(first_shard[self._slide_store], self._slide_n_tiles)
        return row

    def shard_starts(self) -> np.ndarray:
        """The first tile index of every shard, ascending: O(shards), no per-tile array (a
        slide always starts a fresh shard, so its shards start every ``shard_size`` tiles)."""
        shard_size = np.array([s.shard_size for s in self._stores], np.int64)[self._slide_store]
        per_slide = -(-self._slide_n_tiles // shard_size)
        first = np.repeat(self._slide_tile_start, per_slide)
        ordinal = np.arange(int(per_slide.sum())) - np.repeat(np.cumsum(per_slide) - per_slide,
                                                               per_slide)  # fmt: skip
        return first + ordinal * np.repeat(shard_size, per_slide)

    @cached_property
    def fingerprint(self) -> str:
        """Stable content hash: codec, tile size, class names, slide records and the hash of
        each slide's tile-table bytes (O(slides): those hashes are recorded at commit)."""
        h = hashlib.sha256()
        for store in self._stores:
            t = store.table
            h.update(f"{store.codec.name}|{store.tile_size}|{store.class_names}".encode())
            content = [{k: v for k, v in s.items() if k not in _NOT_CONTENT} for s in t.slides]
            h.update(json.dumps(content, sort_keys=True).encode())
            h.update("|".join(t.digests).encode())
            h.update("|".join(t.groups).encode())
        return h.hexdigest()[:16]

    def storage_bytes(self) -> int:
        """Bytes the encoded tiles take (all stores)."""
        return sum(s.storage_bytes() for s in self._stores)

    def zarr_row(self, i: int) -> tuple[str, int]:
        """(store path or URL, row of tile ``i`` in that store's zarr array ``tiles``)."""
        store_ids, rows = self._locate([i])
        return self.paths[int(store_ids[0])], int(rows[0])

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


class _UndecodableTileError(Exception):
    """Inside :meth:`PatchStore.read`: the tile in slot ``slot`` of the batch did not decode."""

    def __init__(self, slot: int, reason: str) -> None:
        super().__init__(slot, reason)
        self.slot, self.reason = slot, reason


def _reason(err: Exception) -> str:
    """A decoder's error as one line: our own reasons as they are, others with their type."""
    text = " ".join(str(err).split()) or "no message"
    return text if isinstance(err, TileDataError) else f"{type(err).__name__}: {text}"


def _common_mpp(mpp: np.ndarray) -> float | None:
    """The tiles' µm/px if all are known and within 1% of each other, else None (mixed).

    The median is taken over at most ~10^6 evenly spaced tiles (exact for smaller tables):
    within the 1% band that changes nothing that matters, and it spares a 10^8-tile copy.
    """
    if len(mpp) == 0:
        return None
    low, high = float(np.min(mpp)), float(np.max(mpp))  # NaN (unknown) propagates
    if not (np.isfinite(low) and np.isfinite(high)):
        return None
    median = float(np.median(mpp[:: max(1, len(mpp) // 1_000_000)]))
    return median if high - low <= 0.01 * median else None
