"""Writing a patch store: atomic per slide, resumable after a crash at any moment.

A slide's tiles go to fresh shards (shard files written once, to a temp name, fsync'ed and
``os.replace``'d); ``commit`` then writes the slide's table segment the same way, and that
rename is the commit point. Anything a killed process left behind (uncommitted shards, temp
files) is ignored by readers and removed when a writer next opens the store.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

from scratchpath.errors import ScratchpathError
from scratchpath.files import atomic_write
from scratchpath.store import layout
from scratchpath.store.codecs import TileCodec, register_zarr_codecs

_REQUIRED_RECORD = ("source", "slide_id", "sha256")


def _write_atomic(path: Path, data: bytes | None = None, arrays: dict | None = None) -> None:
    """Write bytes or an ``.npz`` of ``arrays`` to ``path``; readers see all or nothing."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        if arrays is not None:
            np.savez(f, **arrays)
        else:
            f.write(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreWriter:
    """Creates or appends to a patch store; one writing process per store (a lock enforces it).

    Args:
        path: store folder (created if missing) or a ``file://`` URL.
        tile_size: tile edge in pixels; every tile is (tile_size, tile_size, 3) uint8 RGB.
        codec: ``"jpeg"`` (lossy, ``quality``), ``"jpeg:85"``, ``"zstd[:level]"`` or ``"webp"``
            (lossless); see :mod:`scratchpath.store.codecs` for measured trade-offs.
        quality: JPEG quality when ``codec`` is plain ``"jpeg"``.
        class_names: names of labels 0..K-1 for a labelled store; empty for unlabelled.
        shard_size: tiles per shard file (a slide always starts a fresh shard).

    Opening an existing store checks that tile_size, codec and class_names match.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        tile_size: int,
        codec: str = "jpeg",
        quality: int = 90,
        class_names: Sequence[str] = (),
        shard_size: int = 1024,
    ) -> None:
        loc = layout.Location.parse(path)
        if loc.local is None:
            raise ScratchpathError(f"{path}: stores are written to local folders only")
        register_zarr_codecs()
        self.path = loc.local
        self.codec = TileCodec.parse(codec, tile_size, quality)
        self.tile_size = int(tile_size)
        self.class_names = [str(c) for c in class_names]
        self._lock_file = None
        if (self.path / "zarr.json").exists():
            attrs = layout.read_group_attrs(loc)
            self._check_matches(attrs)
            self.shard_size = int(attrs["shard_size"])
            if not self.class_names:
                self.class_names = list(attrs.get("class_names", []))
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise ScratchpathError(f"{self.path}: exists, is not empty and is not a store")
            self.shard_size = int(shard_size)
            self._create()
        self._lock()
        self._tables = layout.read_tables(loc)
        self._complete = {s["sha256"] for s in self._tables.slides if s["status"] == "ok"}
        self._failed = {(s["sha256"], s["reason"]) for s in self._tables.slides}
        self._next_row = self._ceil_shard(self._tables.end_row)
        self._pending: list[tuple[dict, np.ndarray]] = []  # tile columns committed since open
        self._active: SlideWriter | None = None
        self._clean_uncommitted()

    # -- set-up -----------------------------------------------------------------------------
    def _check_matches(self, attrs: dict) -> None:
        for field, mine in (("tile_size", self.tile_size), ("codec", self.codec.name)):
            if attrs.get(field) != mine:
                raise ScratchpathError(
                    f"{self.path}: {field} is {attrs.get(field)!r} in the store, not {mine!r}"
                )
        theirs = list(attrs.get("class_names", []))
        if self.class_names and self.class_names != theirs:
            raise ScratchpathError(
                f"{self.path}: class_names are {theirs} in the store, not {self.class_names}"
            )

    def _create(self) -> None:
        """Build the empty store in a temp folder, then rename it into place (all or nothing)."""
        import shutil

        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.creating")
        shutil.rmtree(tmp, ignore_errors=True)
        self._write_empty_store(tmp)
        if self.path.exists():
            self.path.rmdir()  # checked empty by the caller
        os.rename(tmp, self.path)

    def _write_empty_store(self, root: Path) -> None:
        import zarr

        root.mkdir(parents=True)
        attrs = {
            layout.VERSION_KEY: layout.STORE_FORMAT_VERSION,
            "tile_size": self.tile_size,
            "codec": self.codec.name,
            "shard_size": self.shard_size,
            "class_names": self.class_names,
        }
        zarr.create_group(store=str(root), attributes=attrs, zarr_format=3)
        zarr.create_group(store=str(root / layout.TABLES), zarr_format=3)
        codecs = self.codec.zarr_codecs()
        t = self.tile_size
        zarr.create_array(
            store=str(root / layout.TILES),
            shape=(0, t, t, 3),
            chunks=(1, t, t, 3),
            shards=(self.shard_size, t, t, 3),
            dtype="uint8",
            serializer=codecs[0],
            compressors=codecs[1:] or None,
            fill_value=0,
            dimension_names=["tile", "y", "x", "channel"],
            zarr_format=3,
        )

    def _lock(self) -> None:
        self._lock_file = open(self.path / layout.TABLES / ".write.lock", "a")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise ScratchpathError(f"{self.path}: another process is writing this store") from None

    def _clean_uncommitted(self) -> None:
        """Drop what a crashed writer left: shards past the committed rows and temp files."""
        first_free_shard = self._next_row // self.shard_size
        shard_root = self.path / layout.TILES / "c"
        if shard_root.is_dir():
            for name in os.listdir(shard_root):
                if name.isdigit() and int(name) >= first_free_shard:
                    _remove_tree(shard_root / name)
        for folder in (self.path / layout.TABLES, shard_root):
            if folder.is_dir():
                for tmp in folder.rglob(".*.tmp"):
                    tmp.unlink(missing_ok=True)
        for partial in (self.path / layout.TILES).glob("*.partial"):  # zarr's own temp files
            partial.unlink(missing_ok=True)
        covered = set(self._tables.segments)
        for name in os.listdir(self.path / layout.TABLES):
            if layout.SEGMENT_RE.match(name) and name not in covered:
                (self.path / layout.TABLES / name).unlink(missing_ok=True)

    def _ceil_shard(self, row: int) -> int:
        return -(-row // self.shard_size) * self.shard_size

    # -- public API -------------------------------------------------------------------------
    def is_complete(self, slide_key: str) -> bool:
        """True if a slide with this sha256 (of its source file) is already committed as ok."""
        return slide_key in self._complete

    def begin_slide(self, record: dict) -> SlideWriter:
        """Start writing one slide; its tiles become visible only at ``commit()``.

        ``record`` holds source, slide_id, bytes, sha256, vendor, width, height, mpp (and any
        other JSON-serialisable fields, kept in the slide table).
        """
        if self._active is not None:
            raise RuntimeError("a slide is still being written: commit() or abort() it first")
        missing = [k for k in _REQUIRED_RECORD if k not in record]
        if missing:
            raise ValueError(f"slide record lacks {missing}")
        self._active = SlideWriter(self, dict(record), self._next_row)
        return self._active

    def record_failure(self, record: dict, reason: str) -> None:
        """Add a slide with status "failed" and ``reason`` to the slide table (no tiles)."""
        if (record.get("sha256"), reason) in self._failed:
            return  # the same failure seen again on resume
        slide = {**_slide_defaults(record), "status": "failed", "reason": str(reason)}
        slide.update(n_tiles=0, row_start=self._tables.end_row)
        self._commit_segment([slide], layout.empty_columns(), np.zeros(0, np.int64))

    def close(self) -> None:
        """Merge the table segments into one (faster opening) and release the lock."""
        if self._lock_file is None:
            return
        if self._active is not None:
            self._active.abort()
        if len(self._tables.segments) > 1:
            self._merge_segments()
        self._lock_file.close()
        self._lock_file = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals used by SlideWriter --------------------------------------------------------
    def _write_shard(self, shard: int, blobs: list[bytes]) -> None:
        path = self.path / layout.shard_key(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, layout.build_shard(blobs, 0, self.shard_size))

    def _commit_segment(self, slides: list[dict], columns: dict, rows: np.ndarray) -> None:
        first = len(self._tables.slides)
        columns = dict(columns)
        for i, slide in enumerate(slides):
            slide["slide_index"] = first + i
        columns["slide_index"] = np.full(len(rows), first + len(slides) - 1, np.int64)
        end_row = max(self._tables.end_row, *(s["row_start"] + s["n_tiles"] for s in slides))
        self._grow_array(end_row)
        name = layout.segment_name(first, len(slides))
        arrays = layout.encode_segment(slides, columns, rows)
        _write_atomic(self.path / layout.TABLES / name, arrays=arrays)  # the commit point
        _fsync_dir(self.path / layout.TABLES)
        t = self._tables
        t.slides.extend(slides)
        self._pending.append((columns, rows))  # concatenated only when merging (no O(N²))
        t.segments.append(name)
        for slide in slides:
            self._failed.add((slide["sha256"], slide["reason"]))
            if slide["status"] == "ok":
                self._complete.add(slide["sha256"])
        self._next_row = self._ceil_shard(t.end_row)

    def _grow_array(self, end_row: int) -> None:
        """Keep the zarr array's shape covering every committed row (zarr writes it atomically)."""
        import zarr

        array = zarr.open_array(str(self.path / layout.TILES), mode="r+")
        if array.shape[0] < end_row:
            array.resize((end_row, *array.shape[1:]))

    def _merge_segments(self) -> None:
        t = self._tables
        parts = [(t.columns, t.rows), *self._pending]
        t.columns = {k: layout.concat_column(k, [c[k] for c, _ in parts]) for k in t.columns}
        t.rows = np.concatenate([r for _, r in parts])
        self._pending = []
        name = layout.segment_name(0, len(t.slides))
        arrays = layout.encode_segment(t.slides, t.columns, t.rows)
        _write_atomic(self.path / layout.TABLES / name, arrays=arrays)
        _fsync_dir(self.path / layout.TABLES)
        for old in t.segments:
            if old != name:
                (self.path / layout.TABLES / old).unlink(missing_ok=True)
        t.segments = [name]


class SlideWriter:
    """Tiles of one slide, buffered into whole shards; visible only after :meth:`commit`."""

    def __init__(self, store: StoreWriter, record: dict, row_start: int) -> None:
        self._store = store
        self._record = record
        self._row_start = row_start
        self._blobs: list[bytes] = []  # the shard being filled
        self._shards_written: list[int] = []
        self._n = 0
        self._columns: dict[str, list[np.ndarray]] = {k: [] for k in layout.TILE_COLUMNS}
        self._done = False

    def add(self, tiles: np.ndarray, **columns: np.ndarray) -> None:
        """Encode and append tiles (N, H, W, 3) uint8 with per-tile ``columns`` (x, y, level,
        mpp, tissue_fraction, label, group; missing ones get defaults)."""
        tiles = np.asarray(tiles)
        if tiles.ndim == 3:
            tiles = tiles[None]
        self.add_encoded([self._store.codec.encode(tile) for tile in tiles], **columns)

    def add_encoded(self, blobs: Sequence[bytes], **columns: np.ndarray) -> None:
        """Append tiles already encoded with ``StoreWriter.codec`` (e.g. by worker processes)."""
        if self._done:
            raise RuntimeError("slide already committed or aborted")
        n = len(blobs)
        unknown = set(columns) - (set(layout.TILE_COLUMNS) - {"slide_index"})
        if unknown:
            raise TypeError(
                f"unknown tile columns {sorted(unknown)} (slide_index is set by commit)"
            )
        checked = {}
        for key, (dtype, default) in layout.TILE_COLUMNS.items():
            arr = np.asarray(columns.get(key, default))
            arr = arr.astype(str) if dtype.kind == "U" else arr.astype(dtype)
            if arr.ndim == 0:
                arr = np.full(n, arr, arr.dtype)  # (a bare np.dtype(str) would truncate text)
            if len(arr) != n:
                raise ValueError(f"column {key!r} has {len(arr)} values for {n} tiles")
            checked[key] = arr
        n_classes = len(self._store.class_names)
        if n and (checked["label"].min() < -1 or checked["label"].max() >= n_classes):
            raise ValueError(f"labels must lie in -1..{n_classes - 1} (one per class name)")
        for key, arr in checked.items():
            self._columns[key].append(arr)
        for blob in blobs:
            self._blobs.append(bytes(blob))
            if len(self._blobs) == self._store.shard_size:
                self._flush()
        self._n += n

    def _flush(self) -> None:
        if not self._blobs:
            return
        shard = self._row_start // self._store.shard_size + len(self._shards_written)
        self._store._write_shard(shard, self._blobs)
        self._shards_written.append(shard)
        self._blobs = []

    def commit(self) -> None:
        """Make the slide and all its tiles visible, atomically."""
        if self._done:
            raise RuntimeError("slide already committed or aborted")
        self._flush()
        columns = {
            k: np.concatenate(v) if v else layout.empty_columns()[k]
            for k, v in self._columns.items()
        }
        slide = {**_slide_defaults(self._record), "status": "ok", "reason": ""}
        slide.update(n_tiles=self._n, row_start=self._row_start)
        rows = np.arange(self._row_start, self._row_start + self._n, dtype=np.int64)
        self._store._commit_segment([slide], columns, rows)
        self._finish()

    def abort(self) -> None:
        """Forget this slide's tiles (their shards are deleted)."""
        if self._done:
            return
        for shard in self._shards_written:
            (self._store.path / layout.shard_key(shard)).unlink(missing_ok=True)
        self._finish()

    def _finish(self) -> None:
        self._done = True
        self._blobs = []
        self._store._active = None

    def __enter__(self) -> SlideWriter:
        return self

    def __exit__(
        self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None and not self._done:
            self.commit()
        else:
            self.abort()


def _slide_defaults(record: dict) -> dict:
    slide = {"source": "", "slide_id": "", "sha256": "", "bytes": 0, "vendor": "", "width": 0,
             "height": 0, "mpp": None, **record}  # fmt: skip
    slide["source"] = str(slide["source"])
    return slide


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
