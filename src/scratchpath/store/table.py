"""The tile table of format-2 stores: append-only column files, memory-mapped by readers.

```
tables/slides.jsonl        one line per committed slide (the commit point, fsync'ed):
                           {"slide": record, "table": {"tile_start", "n_tiles", "new_groups",
                           "sha256", "crc32c"}}; "new_groups" extends the store's group
                           dictionary; "crc32c": true when the slide's tile checksums exist
tables/tile/<column>.bin   one raw little-endian array per column (TABLE_DTYPES), written at
                           tile_start by each commit *before* its slides.jsonl line
tables/tile/crc32c.bin     <u4 per tile: the CRC-32C of each tile's stored bytes, written at
                           commit (stores written before it existed have none: ``verify``
                           then checks that their tiles decode)
```

Why this layout: at 10^8 tiles the table must be shared, not copied, by every rank and
DataLoader worker, so readers ``np.memmap`` the column files (32 bytes per tile in all, in the
page cache once per machine); a commit writes only its own tiles' bytes and one line, so
ingesting slide 10,000 costs what slide 1 did; and the only per-tile text, the group id, is an
int32 code into a small dictionary (code 0 is "", no group). The checksums are not a training
column: only ``scratchpath verify`` reads them.

Crash safety: a column file may hold bytes past the committed tiles (a killed commit) and
slides.jsonl a partial last line; readers use only complete lines and the tiles they count, and
a writer truncates both tails when it opens the store (:mod:`scratchpath.store.append`).

One committed state: a reader may be asked for the first ``max_slides`` committed slides only;
because a writer only ever appends (lines, column tails, fresh shards), that prefix is exactly
the store as it was when it held that many slides. DataLoader workers and DDP ranks open a
store that way, so an ingest appending to it during a run changes nothing the run reads.

Several stores opened together are merged into one cached table (:mod:`scratchpath.store.merge`,
cached by :mod:`scratchpath.store.cache`); remote (fsspec) stores are cached the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scratchpath.errors import ScratchpathError
from scratchpath.store import cache

SLIDES_FILE = "slides.jsonl"
TILE_FOLDER = "tile"
CHECKSUM_FILE = "crc32c.bin"  # in TILE_FOLDER; not a column of the training table
CHECKSUM_DTYPE = np.dtype("<u4")

# Per-tile columns as stored (and as PatchStore.tiles exposes them) and their default value.
TABLE_DTYPES: dict[str, tuple[np.dtype, object]] = {
    "slide_index": (np.dtype("<i4"), 0),
    "x": (np.dtype("<i4"), 0),
    "y": (np.dtype("<i4"), 0),
    "level": (np.dtype("<i2"), 0),
    "mpp": (np.dtype("<f8"), np.nan),
    "tissue_fraction": (np.dtype("<f4"), 1.0),
    "label": (np.dtype("<i2"), -1),
    "group": (np.dtype("<i4"), 0),  # code into the group dictionary; 0 is "" (no group)
}
BYTES_PER_TILE = sum(dtype.itemsize for dtype, _ in TABLE_DTYPES.values())

# Merged or fetched tables below this many tiles stay in process memory (cheaper than a cache
# folder).
IN_MEMORY_TILES = 1 << 20


@dataclass
class TileTable:
    """Slides and the columnar tile table of one store (or of several merged into one).

    ``columns`` are numpy arrays (``np.memmap`` for large tables) of the TABLE_DTYPES;
    ``tile_start``/``row_start``/``n_tiles`` are per slide (int64): the slide's first tile in
    the table, its first row in the tile array, its tile count; ``groups`` is the dictionary the
    ``group`` codes index; ``digests`` hash each slide's table lines (for the fingerprint);
    ``checksummed`` says per slide whether its tiles' CRC-32C were recorded at commit.
    """

    slides: list[dict]
    columns: dict[str, np.ndarray]
    groups: list[str]
    tile_start: np.ndarray
    row_start: np.ndarray
    n_tiles: np.ndarray
    digests: list[str] = field(default_factory=list)
    checksummed: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.n_tiles.sum())

    @property
    def end_row(self) -> int:
        """One past the last row any committed slide reserved."""
        return int((self.row_start + self.n_tiles).max()) if len(self.slides) else 0

    def state_digest(self) -> str:
        """A short hash of the committed slides (their source's sha256 and slide id) and of
        their table digests: with the slide count, what identifies this committed state of the
        store (O(slides))."""
        h = hashlib.sha256("".join(self.digests).encode())
        for slide in self.slides:
            h.update(f"|{slide.get('sha256', '')}|{slide.get('slide_id', '')}".encode())
        return h.hexdigest()[:16]


def empty_columns(n: int = 0) -> dict[str, np.ndarray]:
    return {k: np.full(n, default, dtype) for k, (dtype, default) in TABLE_DTYPES.items()}


def _per_slide(slides: list[dict], key: str) -> np.ndarray:
    return np.array([int(s[key]) for s in slides], np.int64)


# -- reading ----------------------------------------------------------------------------------
def parse_slide_lines(data: bytes) -> tuple[list[dict], int]:
    """The committed lines of a slides.jsonl and the byte length they cover (a torn last line,
    from a killed writer or one still writing, is not committed).

    A line is written with one ``write`` ending in its newline, so everything up to the last
    newline is committed; it is parsed as one JSON array (3x faster than line by line).
    """
    end = data.rfind(b"\n") + 1
    if end == 0:
        return [], 0
    try:
        return json.loads(b"[" + data[: end - 1].replace(b"\n", b",") + b"]"), end
    except ValueError:
        pass
    entries: list[dict] = []  # a damaged line: keep the lines before it
    end = 0
    for line in data.splitlines(keepends=True):
        try:
            entry = json.loads(line) if line.endswith(b"\n") else None
        except ValueError:
            entry = None
        if entry is None:
            break
        entries.append(entry)
        end += len(line)
    return entries, end


def committed_prefix(entries: list[dict], max_slides: int | None, where: str) -> list[dict]:
    """The first ``max_slides`` committed entries (all when None): the store as it was when it
    held that many slides. Fewer than asked means the store was replaced or damaged."""
    if max_slides is None:
        return entries
    if len(entries) < max_slides:
        raise ScratchpathError(
            f"{where}: holds {len(entries)} committed slides, fewer than the {max_slides} this "
            "run opened (the store was replaced or damaged since)"
        )
    return entries[:max_slides]


def table_from_entries(
    entries: list[dict], columns: dict[str, np.ndarray], where: str
) -> TileTable:
    """Build a TileTable from slides.jsonl entries and the full-length column arrays."""
    slides = [e["slide"] for e in entries]
    groups = [""]
    for e in entries:
        groups.extend(e["table"]["new_groups"])
    n = sum(int(e["table"]["n_tiles"]) for e in entries)
    if isinstance(columns, LazyColumns):  # checked and cut to n when first mapped
        out = columns
    else:
        out = {}
        for key in TABLE_DTYPES:
            col = columns[key]
            if len(col) < n:
                raise ScratchpathError(
                    f"{where}: tile column {key!r} holds {len(col)} of {n} committed tiles "
                    "(damaged)"
                )
            out[key] = col[:n]
    return TileTable(
        slides=slides,
        columns=out,
        groups=groups,
        tile_start=np.array([int(e["table"]["tile_start"]) for e in entries], np.int64),
        row_start=_per_slide(slides, "row_start"),
        n_tiles=_per_slide(slides, "n_tiles"),
        digests=[str(e["table"]["sha256"]) for e in entries],
        checksummed=np.array([bool(e["table"].get("crc32c")) for e in entries], bool),
    )


class LazyColumns(Mapping):
    """A local store's columns, each memory-mapped on first access (opening 10^3 stores whose
    merged table is cached maps none of theirs), checked to hold the ``n`` committed tiles."""

    def __init__(self, folder: Path, n: int, where: str) -> None:
        self._folder, self._n, self._where = folder, n, where
        self._mapped: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        col = self._mapped.get(key)
        if col is None:
            if key not in TABLE_DTYPES:
                raise KeyError(key)
            dtype = TABLE_DTYPES[key][0]
            path = self._folder / f"{key}.bin"
            size = path.stat().st_size if path.exists() else 0
            if size < self._n * dtype.itemsize:
                raise ScratchpathError(
                    f"{self._where}: tile column {key!r} holds {size // dtype.itemsize} of "
                    f"{self._n} committed tiles (damaged)"
                )
            col = np.memmap(path, dtype, "r", shape=(self._n,)) if self._n else np.zeros(0, dtype)
            self._mapped[key] = col
        return col

    def __iter__(self):
        return iter(TABLE_DTYPES)

    def __len__(self) -> int:
        return len(TABLE_DTYPES)


def map_columns(folder: Path) -> dict[str, np.ndarray]:
    """Memory-map every column file of ``folder`` (read-only; empty files give empty arrays)."""
    columns = {}
    for key, (dtype, _) in TABLE_DTYPES.items():
        path = folder / f"{key}.bin"
        size = path.stat().st_size if path.exists() else 0
        n = size // dtype.itemsize
        columns[key] = np.memmap(path, dtype, "r", shape=(n,)) if n else np.zeros(0, dtype)
    return columns


def read_local_table(tables: Path, where: str, max_slides: int | None = None) -> TileTable:
    """The committed table of a local format-2 store (columns memory-mapped), or its first
    ``max_slides`` slides."""
    try:
        data = (tables / SLIDES_FILE).read_bytes()
    except FileNotFoundError:
        data = b""
    entries = committed_prefix(parse_slide_lines(data)[0], max_slides, where)
    n = sum(int(e["table"]["n_tiles"]) for e in entries)
    return table_from_entries(entries, LazyColumns(tables / TILE_FOLDER, n, where), where)


def read_remote_table(loc, tables_key: str, max_slides: int | None = None) -> TileTable:
    """The committed table of a format-2 store behind fsspec (columns fetched whole, cached on
    local disk when large)."""
    try:
        data = loc.read_bytes(f"{tables_key}/{SLIDES_FILE}")
    except FileNotFoundError:
        data = b""
    entries = committed_prefix(parse_slide_lines(data)[0], max_slides, loc.url)
    n = sum(int(e["table"]["n_tiles"]) for e in entries)
    digests = "".join(str(e["table"]["sha256"]) for e in entries)
    key = hashlib.sha256(f"remote|{loc.url}|{len(entries)}|{digests}".encode()).hexdigest()[:24]
    if n >= IN_MEMORY_TILES:
        folder = cache.cached_or_none(
            f"table-{key}", lambda tmp: _fetch_columns(loc, tables_key, n, tmp), "remote tile table"
        )
        if folder is not None:
            return table_from_entries(entries, map_columns(folder), loc.url)
    columns = {}
    for name, (dtype, _) in TABLE_DTYPES.items():
        size = n * dtype.itemsize
        raw = loc.read_range(f"{tables_key}/{TILE_FOLDER}/{name}.bin", 0, size) if size else b""
        columns[name] = np.frombuffer(raw, dtype).copy()
    return table_from_entries(entries, columns, loc.url)


def _fetch_columns(loc, tables_key: str, n: int, folder: Path) -> None:
    for name, (dtype, _) in TABLE_DTYPES.items():
        raw = loc.read_range(f"{tables_key}/{TILE_FOLDER}/{name}.bin", 0, n * dtype.itemsize)
        with open(folder / f"{name}.bin", "wb") as f:  # plain writes: ENOSPC is an OSError
            f.write(raw)


def read_checksums(loc, start: int, n: int) -> np.ndarray | None:
    """The recorded CRC-32C of tiles ``start .. start + n`` of a store, or None if absent."""
    key = f"tables/{TILE_FOLDER}/{CHECKSUM_FILE}"
    size = CHECKSUM_DTYPE.itemsize
    try:
        if loc.local is not None:
            with open(loc.local / key, "rb") as f:
                f.seek(start * size)
                raw = f.read(n * size)
        else:
            raw = loc.read_range(key, start * size, (start + n) * size)
    except FileNotFoundError:
        return None
    if len(raw) < n * size:
        return None
    return np.frombuffer(raw, CHECKSUM_DTYPE)


def json_default(value: object) -> object:
    """Slide records may carry numpy scalars or paths (e.g. from a slide reader)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"slide record field of type {type(value).__name__} is not JSON")
