"""On-disk layout of a patch store, shared by the writer and the reader.

```
store.zarr/
  zarr.json              zarr v3 group; attributes: scratchpath_format_version, tile_size,
                         codec, shard_size, class_names
  tiles/zarr.json        zarr v3 array (rows, H, W, 3) uint8, one tile per inner chunk,
                         `shard_size` tiles per shard (sharding_indexed, index at the end)
  tiles/c/<k>/0/0/0      shard k: encoded tiles, then (offset, nbytes) uint64 pairs + crc32c
  tables/zarr.json       zarr v3 group holding the committed tables (no arrays)
  tables/slides.jsonl    format 2: one line per committed slide (the commit point)
  tables/tile/<col>.bin  format 2: one append-only column file per tile column, memory-mapped
                         by readers (see :mod:`scratchpath.store.table`)
  tables/seg-<first>-<count>.npz   format 1 only: `count` slide records from slide `first` on
                         with their tile rows and columns (read, and migrated by a writer)
```

Why a (rows, H, W, 3) image array with one tile per inner chunk rather than an array of
encoded blobs: zarr itself decodes it (``group["tiles"][i]`` is the RGB tile, with the codecs
registered), while scratchpath's reader takes the same bytes straight from the shard index
(~10 µs per tile against ~200 µs to decode a JPEG tile). Measured on one core
(benchmarks/bench_store_read.py): PatchStore random reads 0.9× the bare imagecodecs decode rate
and 1.7× JPEG files + PIL; zarr-python's own reads of the same store are 5× slower per tile.
1024 tiles per shard (~17 MB of JPEG tiles) keeps a million tiles in about a thousand files.

Visibility rule: a tile exists only if a committed slide line (format 2) or table segment
(format 1) lists it. A slide's tiles start on a fresh shard and committed shards are never
rewritten, so a crash at any moment leaves uncommitted rows (ignored, cleaned on the next
write) and never damages committed ones. Format 1 readers cover slides 0, 1, ... greedily with
the longest segment starting at each position (a crash during a segment merge is harmless).

Format history: 1 (npz table segments, JPEG with 4:2:0 chroma recorded as ``jpeg:Q``);
2 (append-only memory-mapped columns, group codes; JPEG codec names carry their chroma
subsampling, ``jpeg:Q:444``). Format-1 stores still open; a writer migrates one to format 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np

from scratchpath.errors import ScratchpathError
from scratchpath.store.table import json_default

STORE_FORMAT_VERSION = 2
VERSION_KEY = "scratchpath_format_version"
TABLES = "tables"
TILES = "tiles"
EMPTY = np.uint64(2**64 - 1)  # sharding index entry of a missing chunk
SEGMENT_RE = re.compile(r"^seg-(\d{10})-(\d{10})\.npz$")

# Per-tile columns, their dtype and the value used when a writer does not give one.
TILE_COLUMNS: dict[str, tuple[np.dtype, object]] = {
    "slide_index": (np.dtype(np.int64), 0),
    "x": (np.dtype(np.int64), 0),
    "y": (np.dtype(np.int64), 0),
    "level": (np.dtype(np.int64), 0),
    "mpp": (np.dtype(np.float64), np.nan),
    "tissue_fraction": (np.dtype(np.float32), 1.0),
    "label": (np.dtype(np.int64), -1),
    "group": (np.dtype(str), ""),
}


def segment_name(first: int, count: int) -> str:
    return f"seg-{first:010d}-{count:010d}.npz"


def shard_key(shard: int) -> str:
    return f"{TILES}/c/{shard}/0/0/0"


@dataclass
class Location:
    """Where a store lives: a local folder (fast path) or an fsspec filesystem + root.

    The filesystem is per process: async filesystems (s3fs, gcsfs) refuse to work in a forked
    child (``RuntimeError: This class is not fork-safe``), so a process that did not make it
    (a forked DataLoader worker, a DDP rank) makes its own from the same arguments on first use.
    fsspec's instance cache is per process too, so this costs one new client per process.
    """

    url: str
    local: Path | None
    root: str = ""
    _fs: fsspec.AbstractFileSystem | None = field(default=None, repr=False, compare=False)
    _fs_pid: int = field(default=-1, repr=False, compare=False)

    @classmethod
    def parse(cls, path_or_url: str | os.PathLike) -> Location:
        text = os.fspath(path_or_url)
        if "://" not in text and "::" not in text:
            return cls(url=text, local=Path(text))
        try:
            fs, root = fsspec.core.url_to_fs(text)
        except (ImportError, ValueError) as err:
            raise ScratchpathError(f"{text}: cannot open this URL ({err})") from None
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        if "file" in protocols or "local" in protocols:
            return cls(url=text, local=Path(root))
        return cls(url=text, local=None, root=root.rstrip("/"), _fs=fs, _fs_pid=os.getpid())

    @property
    def fs(self) -> fsspec.AbstractFileSystem | None:
        """The fsspec filesystem of a remote store, made anew in a process that did not make it
        (None for a local folder)."""
        if self._fs is not None and self._fs_pid != os.getpid():
            old = self._fs
            self._fs = type(old)(*old.storage_args, **old.storage_options)
            self._fs_pid = os.getpid()
        return self._fs

    def _full(self, key: str) -> str:
        return str(self.local / key) if self.local is not None else f"{self.root}/{key}"

    def read_bytes(self, key: str) -> bytes:
        if self.local is not None:
            return (self.local / key).read_bytes()
        return self.fs.cat_file(self._full(key))

    def exists(self, key: str) -> bool:
        if self.local is not None:
            return (self.local / key).exists()
        return self.fs.exists(self._full(key))

    def listdir(self, key: str) -> list[str]:
        if self.local is not None:
            folder = self.local / key
            return sorted(os.listdir(folder)) if folder.is_dir() else []
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self._full(key), detail=False))
        except FileNotFoundError:
            return []

    def size(self, key: str) -> int:
        if self.local is not None:
            return (self.local / key).stat().st_size
        return int(self.fs.size(self._full(key)))

    def read_range(self, key: str, start: int, stop: int | None) -> bytes:
        return self.fs.cat_file(self._full(key), start=start, end=stop)

    def read_ranges(self, keys: list[str], starts: list[int], stops: list[int | None]) -> list:
        """Several byte ranges in one ``fs.cat_ranges`` call (concurrent requests on async
        filesystems such as s3fs and gcsfs); a negative start counts from the end."""
        if not keys:
            return []
        got = self.fs.cat_ranges([self._full(k) for k in keys], starts, stops, on_error="raise")
        return [bytes(g) for g in got]


def read_group_attrs(loc: Location) -> dict:
    """The root group's attributes, after checking that this is a store we can read."""
    try:
        meta = json.loads(loc.read_bytes("zarr.json"))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ScratchpathError(
            f"{loc.url}: not a scratchpath store ({_why_missing(loc)})"
        ) from None
    except PermissionError as err:
        raise ScratchpathError(
            f"{loc.url}: access denied ({_one_line(err)}); check the credentials "
            "(s3://: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        ) from None
    except (OSError, ValueError) as err:
        raise ScratchpathError(f"{loc.url}: not a scratchpath store ({_one_line(err)})") from None
    if (
        not isinstance(meta, dict)
        or meta.get("zarr_format") != 3
        or meta.get("node_type") != "group"
    ):
        raise ScratchpathError(f"{loc.url}: not a scratchpath store (not a zarr v3 group)")
    attrs = meta.get("attributes") or {}
    version = attrs.get(VERSION_KEY)
    if not isinstance(version, int):
        raise ScratchpathError(f"{loc.url}: not a scratchpath store (no {VERSION_KEY} attribute)")
    if version > STORE_FORMAT_VERSION:
        raise ScratchpathError(
            f"{loc.url}: store format version {version} is newer than this scratchpath reads "
            f"(up to {STORE_FORMAT_VERSION}); upgrade scratchpath"
        )
    return attrs


def _why_missing(loc: Location) -> str:
    """Why a store's zarr.json is not there: no bucket, nothing at the path, or no zarr.json."""
    if loc.local is not None:
        return "no zarr.json" if loc.local.exists() else "no such folder"
    bucket = loc.root.split("/", 1)[0]
    try:
        if "/" in loc.root and not loc.fs.exists(bucket):
            return f"bucket {bucket!r} does not exist"
        if not loc.fs.exists(loc.root):
            return "nothing at this path"
    except OSError as err:
        return _one_line(err)
    return "no zarr.json"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


@dataclass
class Tables:
    """Committed slides and tiles of one store (``rows``: the tile's row in the tile array)."""

    slides: list[dict]
    columns: dict[str, np.ndarray]
    rows: np.ndarray
    segments: list[str]  # the segment files that make up this state, in order

    @property
    def end_row(self) -> int:
        """One past the last row any committed slide reserved."""
        ends = [s["row_start"] + s["n_tiles"] for s in self.slides]
        return max(ends, default=0)


def empty_columns(n: int = 0) -> dict[str, np.ndarray]:
    return {k: np.full(n, default, dtype) for k, (dtype, default) in TILE_COLUMNS.items()}


def read_v1_table(loc: Location):
    """A format-1 store's npz segments as a :class:`~scratchpath.store.table.TileTable` (in
    memory: format-1 stores predate the memory-mapped table)."""
    from scratchpath.store import table as tbl

    old = read_tables(loc)
    n_tiles = np.array([int(s["n_tiles"]) for s in old.slides], np.int64)
    tile_start = np.concatenate([[0], np.cumsum(n_tiles)[:-1]]).astype(np.int64)
    groups, codes = np.unique(np.asarray(old.columns["group"]).astype(str), return_inverse=True)
    names = [""] + [str(g) for g in groups if g != ""]
    remap = np.array([names.index(str(g)) for g in groups], np.int32)
    columns = {}
    for key, (dtype, _) in tbl.TABLE_DTYPES.items():
        col = remap[codes.reshape(-1)] if key == "group" else old.columns[key]
        columns[key] = np.asarray(col).astype(dtype)
    digests = []
    for start, n in zip(tile_start.tolist(), n_tiles.tolist(), strict=True):
        h = hashlib.sha256()
        for key in tbl.TABLE_DTYPES:
            h.update(np.ascontiguousarray(columns[key][start : start + n]).tobytes())
        digests.append(h.hexdigest())
    return tbl.TileTable(
        slides=old.slides,
        columns=columns,
        groups=names,
        tile_start=tile_start,
        row_start=np.array([int(s["row_start"]) for s in old.slides], np.int64),
        n_tiles=n_tiles,
        digests=digests,
    )


def read_tables(loc: Location) -> Tables:
    """Load the committed tables: the greedy longest-segment cover of slides 0, 1, 2, ..."""
    for _ in range(3):
        try:
            return _read_tables_once(loc)
        except FileNotFoundError:  # a writer merged segments while we listed them: list again
            continue
    return _read_tables_once(loc)


def _read_tables_once(loc: Location) -> Tables:
    by_first: dict[int, list[tuple[int, str]]] = {}
    for name in loc.listdir(TABLES):
        match = SEGMENT_RE.match(name)
        if match:
            by_first.setdefault(int(match[1]), []).append((int(match[2]), name))
    slides: list[dict] = []
    parts: list[dict[str, np.ndarray]] = []
    rows: list[np.ndarray] = []
    names: list[str] = []
    while len(slides) in by_first:
        count, name = max(by_first[len(slides)])
        with np.load(_open_npz(loc, f"{TABLES}/{name}"), allow_pickle=False) as seg:
            seg_slides = json.loads(str(seg["slides_json"]))
            parts.append({k: seg[k] for k in TILE_COLUMNS})
            rows.append(seg["row"])
        if len(seg_slides) != count:
            raise ScratchpathError(
                f"{loc.url}/{TABLES}/{name}: segment holds {len(seg_slides)} slides"
            )
        slides.extend(seg_slides)
        names.append(name)
    columns = empty_columns()
    if parts:
        columns = {k: concat_column(k, [p[k] for p in parts]) for k in columns}
    all_rows = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return Tables(slides=slides, columns=columns, rows=all_rows, segments=names)


def concat_column(key: str, parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate pieces of one tile column (text columns keep their longest string)."""
    dtype = TILE_COLUMNS[key][0]
    if dtype.kind == "U":
        return np.concatenate([np.asarray(p).astype(str) for p in parts])
    return np.concatenate(parts).astype(dtype)


def _open_npz(loc: Location, key: str):
    if loc.local is not None:
        return loc.local / key
    import io

    return io.BytesIO(loc.read_bytes(key))


def encode_segment(slides: list[dict], columns: dict[str, np.ndarray], rows: np.ndarray) -> dict:
    """Arrays for np.savez: no object arrays, so loading never needs pickle."""
    arrays = {k: concat_column(k, [columns[k]]) for k in TILE_COLUMNS}
    arrays["row"] = np.asarray(rows, np.int64)
    arrays["slides_json"] = np.array(json.dumps(slides, sort_keys=True, default=json_default))
    return arrays


def parse_shard_index(data: bytes, shard_size: int, where: str) -> np.ndarray:
    """(shard_size, 2) uint64 (offset, nbytes) from the index bytes at a shard's end."""
    import google_crc32c

    expected = shard_size * 16 + 4
    if len(data) != expected:
        raise ScratchpathError(f"{where}: truncated shard index ({len(data)} of {expected} bytes)")
    body, crc = data[:-4], data[-4:]
    if np.uint32(google_crc32c.value(body)).tobytes() != crc:
        raise ScratchpathError(f"{where}: shard index checksum mismatch (corrupt shard)")
    return np.frombuffer(body, dtype="<u8").reshape(shard_size, 2)


def build_shard(blobs: list[bytes], first_slot: int, shard_size: int) -> bytes:
    """A shard in the zarr v3 sharding_indexed layout with ``blobs`` at consecutive slots."""
    import google_crc32c

    index = np.full((shard_size, 2), EMPTY, dtype="<u8")
    offset = 0
    for slot, blob in enumerate(blobs, start=first_slot):
        index[slot] = (offset, len(blob))
        offset += len(blob)
    index_bytes = index.tobytes()
    crc = np.uint32(google_crc32c.value(index_bytes)).tobytes()
    return b"".join([*blobs, index_bytes, crc])
