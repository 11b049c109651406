"""Writing a format-2 tile table: appending committed slides, and migrating a format-1 table.

A commit writes the slide's tile columns and tile checksums at the end of their files (fsync'ed)
and then its line in ``slides.jsonl`` (fsync'ed: the commit point); see
:mod:`scratchpath.store.table` for the layout and the crash rules.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from scratchpath.store.table import (
    CHECKSUM_DTYPE,
    CHECKSUM_FILE,
    SLIDES_FILE,
    TABLE_DTYPES,
    TILE_FOLDER,
    LazyColumns,
    TileTable,
    json_default,
    parse_slide_lines,
    table_from_entries,
)


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
        checksums = tables / TILE_FOLDER / CHECKSUM_FILE
        if checksums.exists() and checksums.stat().st_size > self.n_tiles * CHECKSUM_DTYPE.itemsize:
            with open(checksums, "ab") as f:
                f.truncate(self.n_tiles * CHECKSUM_DTYPE.itemsize)
        fsync_dir(tables / TILE_FOLDER)
        fsync_dir(tables)

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

    def append(
        self,
        slide: dict,
        columns: dict[str, np.ndarray],
        new_groups: list[str],
        checksums: np.ndarray | None = None,
    ) -> None:
        """Write one slide's tile columns and tile checksums (CRC-32C of each tile's stored
        bytes), then its line (the commit point)."""
        n = int(slide["n_tiles"])
        digest = hashlib.sha256()
        for key, (dtype, _) in TABLE_DTYPES.items():
            data = np.ascontiguousarray(columns[key], dtype).tobytes()
            if len(data) != n * dtype.itemsize:
                raise ValueError(f"column {key!r} has {len(data) // dtype.itemsize} of {n} tiles")
            digest.update(data)
            self._write_at(f"{key}.bin", data, self.n_tiles * dtype.itemsize)
        table = {"tile_start": self.n_tiles, "n_tiles": n, "new_groups": new_groups,
                 "sha256": digest.hexdigest()}  # fmt: skip
        if checksums is not None and n:
            data = np.ascontiguousarray(checksums, CHECKSUM_DTYPE).tobytes()
            if len(data) != n * CHECKSUM_DTYPE.itemsize:
                raise ValueError(f"{len(data) // 4} tile checksums for {n} tiles")
            self._write_at(CHECKSUM_FILE, data, self.n_tiles * CHECKSUM_DTYPE.itemsize)
            table["crc32c"] = True
        entry = {"slide": slide, "table": table}
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

    def _write_at(self, name: str, data: bytes, offset: int) -> None:
        if not data:
            return
        fd = os.open(self.tables / TILE_FOLDER / name, os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            os.pwrite(fd, data, offset)
            os.fdatasync(fd)
        finally:
            os.close(fd)


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
    fsync_dir(tables)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
