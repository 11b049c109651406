"""Writing a patch store: atomic per slide, resumable after a crash at any moment.

A slide's tiles go to fresh shards (shard files written once, to a temp name, fsync'ed and
``os.replace``'d); ``commit`` then writes the slide's tile columns and the CRC-32C of each
tile's stored bytes (which ``scratchpath verify`` checks) at the end of their files and appends
its line to ``tables/slides.jsonl`` (fsync'ed: the commit point). A commit
costs O(its own tiles) whatever the store holds, and opening a store to append reads the slide
lines only (O(slides), no tile column is read). Anything a killed process left behind
(uncommitted shards, column tails, a torn line, temp files) is ignored by readers and removed
when a writer next opens the store. A format-1 store is migrated to format 2 when a writer
opens it (once, O(tiles)).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import google_crc32c
import numpy as np

from scratchpath.errors import ScratchpathError
from scratchpath.files import atomic_write
from scratchpath.store import append, layout
from scratchpath.store import table as tbl
from scratchpath.store.codecs import LEGACY_SUBSAMPLING, TileCodec, register_zarr_codecs

_REQUIRED_RECORD = ("source", "slide_id", "sha256")


def _write_atomic(path: Path, data: bytes | None = None, arrays: dict | None = None) -> None:
    """Write bytes or an ``.npz`` of ``arrays`` to ``path``; readers see all or nothing."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        if arrays is not None:
            np.savez(f, **arrays)
        else:
            f.write(data)


class StoreWriter:
    """Creates or appends to a patch store; one writing process per store (a lock enforces it).

    Args:
        path: store folder (created if missing) or a ``file://`` URL.
        tile_size: tile edge in pixels; every tile is (tile_size, tile_size, 3) uint8 RGB.
        codec: ``"jpeg"`` (lossy, ``quality``, no chroma subsampling), ``"jpeg:85"``,
            ``"jpeg:90:420"`` (chroma subsampled: smaller, ~30 dB), ``"zstd[:level]"`` or
            ``"webp"`` (lossless); see :mod:`scratchpath.store.codecs` for measured trade-offs.
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
        if len(self.class_names) > np.iinfo(np.int16).max:
            raise ScratchpathError(f"class_names: at most 32767 classes, got {len(class_names)}")
        self._lock_file = None
        if (self.path / "zarr.json").exists():
            attrs = layout.read_group_attrs(loc)
            self._check_matches(attrs)
            self.shard_size = int(attrs["shard_size"])
            if not self.class_names:
                self.class_names = list(attrs.get("class_names", []))
            self._lock()
            if int(attrs[layout.VERSION_KEY]) < 2:
                self._migrate(loc, attrs)
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise ScratchpathError(f"{self.path}: exists, is not empty and is not a store")
            self.shard_size = int(shard_size)
            self._create()
            self._lock()
        self._table = append.TableAppender(self.path / layout.TABLES)
        slides = self._table.table.slides
        self._complete = {s["sha256"] for s in slides if s["status"] == "ok"}
        self._complete |= {s["fast_id"] for s in slides if s["status"] == "ok" and "fast_id" in s}
        self._failed = {(_identity(s), s["reason"]) for s in slides}
        self._next_row = self._ceil_shard(self._table.table.end_row)
        self._active: SlideWriter | None = None
        self._array = None  # the zarr array, opened at the first commit
        self._clean_uncommitted()

    # -- set-up -----------------------------------------------------------------------------
    def _check_matches(self, attrs: dict) -> None:
        try:  # a stored JPEG name without subsampling is a format-1 store's 4:2:0
            theirs_codec = TileCodec.parse(
                str(attrs.get("codec")), self.tile_size, 90, LEGACY_SUBSAMPLING
            ).name
        except ScratchpathError:
            theirs_codec = attrs.get("codec")
        for field, mine, theirs in (
            ("tile_size", self.tile_size, attrs.get("tile_size")),
            ("codec", self.codec.name, theirs_codec),
        ):
            if theirs != mine:
                raise ScratchpathError(
                    f"{self.path}: {field} is {theirs!r} in the store, not {mine!r}"
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
        """Drop what a crashed writer left: shards past the committed rows and temp files.

        A writer fills shards in order from the first free one, so probing upwards from it
        finds them all: O(uncommitted shards), not a walk over every shard folder.
        """
        shard_root = self.path / layout.TILES / "c"
        shard = self._next_row // self.shard_size
        while (shard_root / str(shard)).exists():
            _remove_tree(shard_root / str(shard))
            shard += 1
        for tmp in (self.path / layout.TABLES).glob(".*.tmp"):
            _remove_tree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        for partial in (self.path / layout.TILES).glob("*.partial"):  # zarr's own temp files
            partial.unlink(missing_ok=True)

    def _migrate(self, loc: layout.Location, attrs: dict) -> None:
        """Rewrite a format-1 store's npz segments as format-2 columns (once, O(tiles)).

        The new table is complete on disk before ``zarr.json`` says format 2 (an atomic
        rewrite); a crash before that leaves a format-1 store that migrates again.
        """
        import json

        old = layout.read_v1_table(loc)
        # Shards past the committed rows: uncommitted leftovers of a format-1 writer.
        first_free_shard = self._ceil_shard(old.end_row) // self.shard_size
        shard_root = self.path / layout.TILES / "c"
        if shard_root.is_dir():
            for name in os.listdir(shard_root):
                if name.isdigit() and int(name) >= first_free_shard:
                    _remove_tree(shard_root / name)
            for tmp in shard_root.rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        append.write_table(self.path / layout.TABLES, old)
        meta = json.loads((self.path / "zarr.json").read_bytes())
        meta["attributes"] = {**attrs, layout.VERSION_KEY: layout.STORE_FORMAT_VERSION,
                              "codec": self.codec.name}  # fmt: skip
        _write_atomic(self.path / "zarr.json", json.dumps(meta, indent=2).encode())
        for name in os.listdir(self.path / layout.TABLES):
            if layout.SEGMENT_RE.match(name):
                (self.path / layout.TABLES / name).unlink(missing_ok=True)

    def _ceil_shard(self, row: int) -> int:
        return -(-row // self.shard_size) * self.shard_size

    # -- public API -------------------------------------------------------------------------
    def is_complete(self, slide_key: str) -> bool:
        """True if a slide with this key (the sha256 of its source file, or its fast identity
        ``fast_id``: size, mtime and the hash of its first and last MiB) is committed as ok."""
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
        if (_identity(record), str(reason)) in self._failed:
            return  # the same failure seen again on resume
        slide = {**_slide_defaults(record), "status": "failed", "reason": str(reason)}
        slide.update(n_tiles=0, row_start=self._table.table.end_row)
        self._commit(slide, tbl.empty_columns(), np.zeros(0, str))

    @property
    def slides(self) -> list[dict]:
        """The committed slide records (read-only view)."""
        return self._table.table.slides

    def close(self) -> None:
        """Release the lock (an open slide is aborted). Nothing is merged or rewritten."""
        if self._lock_file is None:
            return
        if self._active is not None:
            self._active.abort()
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

    def _commit(
        self, slide: dict, columns: dict, groups: np.ndarray, checksums: np.ndarray | None = None
    ) -> None:
        """Append one slide (record + tile columns + group names + tile checksums) to the
        table: the commit."""
        slide["slide_index"] = len(self._table.table.slides)
        columns = dict(columns)
        columns["slide_index"] = np.full(int(slide["n_tiles"]), slide["slide_index"], np.int32)
        columns["group"], new_groups = self._table.group_codes(groups)
        self._grow_array(max(self._table.table.end_row, slide["row_start"] + slide["n_tiles"]))
        self._table.append(slide, columns, new_groups, checksums)
        self._failed.add((_identity(slide), slide["reason"]))
        if slide["status"] == "ok":
            self._complete.add(slide["sha256"])
            if "fast_id" in slide:
                self._complete.add(slide["fast_id"])
        self._next_row = self._ceil_shard(self._table.table.end_row)

    def _grow_array(self, end_row: int) -> None:
        """Keep the zarr array's shape covering every committed row (zarr writes it atomically)."""
        import zarr

        if self._array is None:
            self._array = zarr.open_array(str(self.path / layout.TILES), mode="r+")
        if self._array.shape[0] < end_row:
            self._array.resize((end_row, *self._array.shape[1:]))


class SlideWriter:
    """Tiles of one slide, buffered into whole shards; visible only after :meth:`commit`."""

    def __init__(self, store: StoreWriter, record: dict, row_start: int) -> None:
        self._store = store
        self._record = record
        self._row_start = row_start
        self._blobs: list[bytes] = []  # the shard being filled
        self._shards_written: list[int] = []
        self._n = 0
        self._columns: dict[str, list[np.ndarray]] = {k: [] for k in _SLIDE_COLUMNS}
        self._checksums: list[int] = []  # CRC-32C of each tile's stored bytes
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
        unknown = set(columns) - set(_SLIDE_COLUMNS)
        if unknown:
            raise TypeError(
                f"unknown tile columns {sorted(unknown)} (slide_index is set by commit)"
            )
        checked = {}
        for key, (dtype, default) in _SLIDE_COLUMNS.items():
            arr = np.asarray(columns.get(key, default))
            if dtype.kind in "iu" and arr.size and arr.dtype.kind in "iuf":
                info = np.iinfo(dtype)
                if arr.min() < info.min or arr.max() > info.max:
                    raise ValueError(f"column {key!r} must fit {dtype.name}")
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
            blob = bytes(blob)
            self._checksums.append(google_crc32c.value(blob))
            self._blobs.append(blob)
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

    def update_record(self, **fields: object) -> None:
        """Change fields of the slide record before the commit (e.g. a hash computed while the
        tiles were read)."""
        if self._done:
            raise RuntimeError("slide already committed or aborted")
        self._record.update(fields)

    def commit(self) -> None:
        """Make the slide and all its tiles visible, atomically."""
        if self._done:
            raise RuntimeError("slide already committed or aborted")
        self._flush()
        columns = {
            k: np.concatenate(v) if v else np.zeros(0, _SLIDE_COLUMNS[k][0])
            for k, v in self._columns.items()
        }
        slide = {**_slide_defaults(self._record), "status": "ok", "reason": ""}
        slide.update(n_tiles=self._n, row_start=self._row_start)
        groups = columns.pop("group")
        self._store._commit(slide, columns, groups, np.array(self._checksums, np.uint32))
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


# What SlideWriter.add takes per tile: the table columns except slide_index (set at commit),
# with groups as names (coded into the store's group dictionary at commit).
_SLIDE_COLUMNS: dict[str, tuple[np.dtype, object]] = {
    **{k: v for k, v in tbl.TABLE_DTYPES.items() if k not in ("slide_index", "group")},
    "group": (np.dtype(str), ""),
}


def _identity(record: dict) -> str:
    """What identifies a slide's source for de-duplicating failures: the fast identity when
    ingest recorded one (failed slides are never fully hashed), else the sha256."""
    return str(record.get("fast_id") or record.get("sha256") or "")


def _slide_defaults(record: dict) -> dict:
    slide = {"source": "", "slide_id": "", "sha256": "", "bytes": 0, "vendor": "", "width": 0,
             "height": 0, "mpp": None, **record}  # fmt: skip
    slide["source"] = str(slide["source"])
    return slide


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
