"""The tile table of format-2 stores: append-only column files, memory-mapped by readers.

```
tables/slides.jsonl        one line per committed slide (the commit point, fsync'ed):
                           {"slide": record, "table": {"tile_start", "n_tiles", "new_groups",
                           "sha256"}}; "new_groups" extends the store's group dictionary
tables/tile/<column>.bin   one raw little-endian array per column (TABLE_DTYPES), written at
                           tile_start by each commit *before* its slides.jsonl line
```

Why this layout: at 10^8 tiles the table must be shared, not copied, by every rank and
DataLoader worker, so readers ``np.memmap`` the column files (32 bytes per tile in all, in the
page cache once per machine); a commit writes only its own tiles' bytes and one line, so
ingesting slide 10,000 costs what slide 1 did; and the only per-tile text, the group id, is an
int32 code into a small dictionary (code 0 is "", no group).

Crash safety: a column file may hold bytes past the committed tiles (a killed commit) and
slides.jsonl a partial last line; readers use only complete lines and the tiles they count, and
a writer truncates both tails when it opens the store.

Several stores opened together (one per SLURM array task, 10^3 of them) are merged once into a
columnar cache folder (``SCRATCHPATH_CACHE``, default ``~/.cache/scratchpath/tables``) keyed by
the stores' committed slide tables, built under a file lock by the first process and then
memory-mapped by all; remote (fsspec) stores are cached the same way. Small tables (below
``IN_MEMORY_TILES``) are simply concatenated in memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scratchpath.errors import ScratchpathError

SLIDES_FILE = "slides.jsonl"
TILE_FOLDER = "tile"

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

# Merged tables below this many tiles stay in process memory (cheaper than a cache folder).
IN_MEMORY_TILES = 1 << 20


def cache_root() -> Path:
    """Where merged and remote tile tables are cached (``SCRATCHPATH_CACHE`` overrides)."""
    env = os.environ.get("SCRATCHPATH_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "scratchpath" / "tables"


@dataclass
class TileTable:
    """Slides and the columnar tile table of one store (or of several merged into one).

    ``columns`` are numpy arrays (``np.memmap`` for large tables) of the TABLE_DTYPES;
    ``tile_start``/``row_start``/``n_tiles`` are per slide (int64): the slide's first tile in
    the table, its first row in the tile array, its tile count; ``groups`` is the dictionary the
    ``group`` codes index; ``digests`` hash each slide's table lines (for the fingerprint).
    """

    slides: list[dict]
    columns: dict[str, np.ndarray]
    groups: list[str]
    tile_start: np.ndarray
    row_start: np.ndarray
    n_tiles: np.ndarray
    digests: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.n_tiles.sum())

    @property
    def end_row(self) -> int:
        """One past the last row any committed slide reserved."""
        return int((self.row_start + self.n_tiles).max()) if len(self.slides) else 0


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


def read_local_table(tables: Path, where: str) -> TileTable:
    """The committed table of a local format-2 store (columns memory-mapped)."""
    try:
        data = (tables / SLIDES_FILE).read_bytes()
    except FileNotFoundError:
        data = b""
    entries, _ = parse_slide_lines(data)
    n = sum(int(e["table"]["n_tiles"]) for e in entries)
    return table_from_entries(entries, LazyColumns(tables / TILE_FOLDER, n, where), where)


def read_remote_table(loc, tables_key: str) -> TileTable:
    """The committed table of a format-2 store behind fsspec (columns fetched whole, cached on
    local disk when large)."""
    try:
        data = loc.read_bytes(f"{tables_key}/{SLIDES_FILE}")
    except FileNotFoundError:
        data = b""
    entries, _ = parse_slide_lines(data)
    n = sum(int(e["table"]["n_tiles"]) for e in entries)
    key = hashlib.sha256(f"remote|{loc.url}|".encode() + data[: len(data)]).hexdigest()[:24]
    if n >= IN_MEMORY_TILES:
        folder = _cached(key, lambda tmp: _fetch_columns(loc, tables_key, n, tmp))
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
        (folder / f"{name}.bin").write_bytes(raw)


# -- merging several stores -----------------------------------------------------------------
def merge_tables(tables: list[TileTable], identity: str) -> TileTable:
    """One table for several stores: slide indices shifted, group codes re-mapped into one
    dictionary. Large merges are written once to the cache folder and memory-mapped."""
    if len(tables) == 1:
        return tables[0]
    groups: list[str] = [""]
    code_of: dict[str, int] = {"": 0}
    remaps = []
    for t in tables:
        for name in t.groups:
            if name not in code_of:
                code_of[name] = len(groups)
                groups.append(name)
        remaps.append(np.array([code_of[name] for name in t.groups], np.int32))
    slide_offsets = np.cumsum([0] + [len(t.slides) for t in tables])
    tile_offsets = np.cumsum([0] + [len(t) for t in tables])
    n = int(tile_offsets[-1])

    def fill(columns: dict[str, np.ndarray]) -> None:
        for i, t in enumerate(tables):
            part = slice(int(tile_offsets[i]), int(tile_offsets[i + 1]))
            for key in TABLE_DTYPES:
                col = t.columns[key]
                if key == "slide_index":
                    columns[key][part] = col + np.int32(slide_offsets[i])
                elif key == "group":
                    columns[key][part] = remaps[i][col]
                else:
                    columns[key][part] = col

    if n >= IN_MEMORY_TILES:

        def build(tmp: Path) -> None:
            columns = {}
            for key, (dtype, _) in TABLE_DTYPES.items():
                columns[key] = np.memmap(tmp / f"{key}.bin", dtype, "w+", shape=(max(n, 1),))
            fill(columns)
            for col in columns.values():
                col.flush()

        try:
            folder = _cached(hashlib.sha256(identity.encode()).hexdigest()[:24], build)
            columns = {k: v[:n] for k, v in map_columns(folder).items()}
        except ScratchpathError as err:  # no writable cache: a private copy still works
            warnings.warn(f"{err}; merging the tile tables in memory instead", stacklevel=3)
            columns = None
    else:
        columns = None
    if columns is None:
        columns = empty_columns(n)
        fill(columns)
    slides = []
    for i, t in enumerate(tables):
        first = int(slide_offsets[i])
        slides.extend({**s, "slide_index": int(s["slide_index"]) + first} for s in t.slides)
    return TileTable(
        slides=slides,
        columns=columns,
        groups=groups,
        tile_start=np.concatenate([t.tile_start + tile_offsets[i] for i, t in enumerate(tables)]),
        row_start=np.concatenate([t.row_start for t in tables]),
        n_tiles=np.concatenate([t.n_tiles for t in tables]),
        digests=[d for t in tables for d in t.digests],
    )


def _cached(key: str, build) -> Path:
    """The cache folder ``key``, built by ``build(tmp_folder)`` once (under a lock, so that the
    ranks of one machine opening the same stores at once build it once)."""
    root = cache_root()
    folder = root / key
    if (folder / "done").exists():
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f".{key}.lock", "a")  # noqa: SIM115
    except OSError as err:
        raise ScratchpathError(f"{root}: cannot write the tile-table cache ({err})") from None
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not (folder / "done").exists():
            tmp = root / f".{key}.{os.getpid()}.building"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            build(tmp)
            (tmp / "done").write_bytes(b"")
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(tmp, folder)
    return folder


# -- writing ----------------------------------------------------------------------------------
class TableAppender:
    """Appends committed slides to a format-2 table (one writer process per store).

    Opening truncates what a killed writer left past the last committed line: O(slides) to
    read the slide lines, O(1) per column file, never O(tiles).
    """

    def __init__(self, tables: Path) -> None:
        self.tables = tables
        (tables / TILE_FOLDER).mkdir(parents=True, exist_ok=True)
        path = tables / SLIDES_FILE
        data = path.read_bytes() if path.exists() else b""
        entries, end = parse_slide_lines(data)
        n = sum(int(e["table"]["n_tiles"]) for e in entries)
        columns = LazyColumns(tables / TILE_FOLDER, n, str(tables))
        self.table = table_from_entries(entries, columns, str(tables))
        self.n_tiles = len(self.table)
        for key in TABLE_DTYPES:  # a killed writer may have left fewer bytes: damaged
            columns[key]
        self._code_of = {name: code for code, name in enumerate(self.table.groups)}
        self.table.columns = {}  # the writer needs counts only: release the maps
        with open(path, "ab") as f:
            f.truncate(end)
        for key, (dtype, _) in TABLE_DTYPES.items():
            with open(tables / TILE_FOLDER / f"{key}.bin", "ab") as f:
                f.truncate(self.n_tiles * dtype.itemsize)
        _fsync_dir(tables / TILE_FOLDER)
        _fsync_dir(tables)

    def group_codes(self, names: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """int32 codes of the group names of one slide, and the names new to the dictionary."""
        names = np.asarray(names).astype(str)
        if len(names) == 0:
            return np.zeros(0, np.int32), []
        unique, inverse = np.unique(names, return_inverse=True)
        new: list[str] = []
        codes = np.empty(len(unique), np.int32)
        for j, name in enumerate(unique.tolist()):
            code = self._code_of.get(name)
            if code is None:
                code = len(self._code_of) + len(new)
                new.append(name)
            codes[j] = code
        return codes[inverse.reshape(-1)], new

    def append(self, slide: dict, columns: dict[str, np.ndarray], new_groups: list[str]) -> None:
        """Write one slide's tile columns, then its line (the commit point)."""
        n = int(slide["n_tiles"])
        digest = hashlib.sha256()
        for key, (dtype, _) in TABLE_DTYPES.items():
            data = np.ascontiguousarray(columns[key], dtype).tobytes()
            if len(data) != n * dtype.itemsize:
                raise ValueError(f"column {key!r} has {len(data) // dtype.itemsize} of {n} tiles")
            digest.update(data)
            fd = os.open(self.tables / TILE_FOLDER / f"{key}.bin", os.O_WRONLY)
            try:
                if data:
                    os.pwrite(fd, data, self.n_tiles * dtype.itemsize)
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        entry = {
            "slide": slide,
            "table": {"tile_start": self.n_tiles, "n_tiles": n, "new_groups": new_groups,
                      "sha256": digest.hexdigest()},
        }  # fmt: skip
        line = (json.dumps(entry, sort_keys=True, default=json_default) + "\n").encode()
        fd = os.open(self.tables / SLIDES_FILE, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        for name in new_groups:
            self._code_of[name] = len(self._code_of)
        t = self.table
        t.slides.append(slide)
        t.groups.extend(new_groups)
        t.tile_start = np.append(t.tile_start, self.n_tiles)
        t.row_start = np.append(t.row_start, int(slide["row_start"]))
        t.n_tiles = np.append(t.n_tiles, n)
        t.digests.append(digest.hexdigest())
        self.n_tiles += n


def write_table(tables: Path, table: TileTable) -> None:
    """Write a whole table as format 2 (migrating a format-1 store): temp names, then renames."""
    tile_dir = tables / TILE_FOLDER
    tmp_dir = tables / f".{TILE_FOLDER}.{os.getpid()}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    lines = []
    for i, slide in enumerate(table.slides):
        start, n = int(table.tile_start[i]), int(table.n_tiles[i])
        digest = hashlib.sha256()
        for key, (dtype, _) in TABLE_DTYPES.items():
            digest.update(np.ascontiguousarray(table.columns[key][start : start + n], dtype))
        new = table.groups[1:] if i == 0 else []  # the whole dictionary rides on the first line
        entry = {"slide": slide, "table": {"tile_start": start, "n_tiles": n, "new_groups": new,
                                           "sha256": digest.hexdigest()}}  # fmt: skip
        lines.append(json.dumps(entry, sort_keys=True, default=json_default) + "\n")
    for key, (dtype, _) in TABLE_DTYPES.items():
        with open(tmp_dir / f"{key}.bin", "wb") as f:
            f.write(np.ascontiguousarray(table.columns[key], dtype).tobytes())
            f.flush()
            os.fsync(f.fileno())
    slides_tmp = tables / f".{SLIDES_FILE}.{os.getpid()}.tmp"
    with open(slides_tmp, "w") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(tile_dir, ignore_errors=True)
    os.rename(tmp_dir, tile_dir)
    os.replace(slides_tmp, tables / SLIDES_FILE)
    _fsync_dir(tables)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_default(value: object) -> object:
    """Slide records may carry numpy scalars or paths (e.g. from a slide reader)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"slide record field of type {type(value).__name__} is not JSON")
