"""Checking the committed tiles of stores, read-only (``scratchpath verify``).

Every committed tile is read back from its shard and checked against what its commit recorded:

- its shard file exists and its index (the zarr sharding index at the file's end, with its own
  CRC-32C) is readable; a missing or truncated shard, or a damaged index, damages every tile
  the shard holds;
- the tile has an index entry and its bytes lie inside the file;
- its bytes have the CRC-32C recorded at commit (``tables/tile/crc32c.bin``; stores written
  before checksums existed have none, and their tiles are checked for decodability only);
- it decodes, with the reader's own codec, to a (tile_size, tile_size, 3) image;
- its table entries are the committed ones: each slide's tile columns still hash to the sha256
  its commit line recorded, and name that slide.

Shards are checked in parallel worker processes, each reading a whole shard once
(sequentially: what network file systems and object stores serve best). Nothing is written.
Cost: one read of every shard and, unless ``decode=False``, one decode per tile (~1 ms per
224 px JPEG tile per core: ~3 core-hours per 10^7 tiles); the table check hashes the 32-byte
table rows (O(tiles), a few seconds per 10^8).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import google_crc32c
import numpy as np

from scratchpath.errors import ScratchpathError
from scratchpath.store import layout
from scratchpath.store import table as tbl
from scratchpath.store.codecs import TileCodec
from scratchpath.store.reader import _OneStore, _reason


@dataclass(frozen=True)
class Damage:
    """One damaged tile (``position`` in its slide, ``tile`` its index in the store), or a whole
    slide's table entries (``position`` None)."""

    store: str
    slide_index: int
    slide_id: str
    position: int | None
    tile: int | None
    reason: str

    def line(self) -> str:
        where = f"{self.store}: slide {self.slide_index} ({self.slide_id})"
        if self.position is None:
            return f"{where}: {self.reason}"
        return f"{where} tile {self.position} (store tile {self.tile}): {self.reason}"


@dataclass
class StoreReport:
    """What verifying one store found."""

    store: str
    tiles: int = 0
    checksummed: int = 0  # tiles checked against a checksum recorded at commit
    damaged: list[Damage] = field(default_factory=list)

    def summary(self) -> str:
        how = (
            "all against checksums recorded at commit"
            if self.checksummed == self.tiles
            else f"{self.checksummed} against checksums recorded at commit, the others "
            "(written before checksums existed) for decodability"
        )
        bad = {(d.slide_index, d.position) for d in self.damaged}
        return f"{self.store}: {self.tiles} tiles checked ({how}): {len(bad)} damaged"


@dataclass(frozen=True)
class _ShardTask:
    """The tiles of one slide that one shard holds (a slide starts a fresh shard, so they sit
    at consecutive slots from ``first_slot``)."""

    url: str
    codec: TileCodec
    shard_size: int
    shard: int
    first_slot: int
    count: int
    slide: int
    slide_id: str
    first_position: int  # in the slide
    first_tile: int  # in the store
    checksummed: bool
    decode: bool


def verify_stores(
    paths: list[str],
    *,
    workers: int = 1,
    decode: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[StoreReport]:
    """Check every committed tile of each store (see the module docstring); ``progress`` is
    called with the number of tiles each finished shard held. Raises ScratchpathError only
    for what is not a readable store at all."""
    reports = []
    for path in paths:
        store = _OneStore(path)
        report = StoreReport(store.loc.url, tiles=len(store.table))
        report.damaged.extend(_check_table(store))
        tasks = _shard_tasks(store, decode, report)
        for found, n in _run(tasks, workers):
            report.damaged.extend(found)
            if progress is not None:
                progress(n)
        report.damaged.sort(key=lambda d: (d.slide_index, -1 if d.position is None else d.position))
        reports.append(report)
    return reports


def _run(tasks: list[_ShardTask], workers: int) -> Iterator[tuple[list[Damage], int]]:
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_check_shard, tasks)
        return
    context = multiprocessing.get_context("spawn")  # no inherited file handles or fs clients
    with context.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(_check_shard, tasks, chunksize=1)


def _shard_tasks(store: _OneStore, decode: bool, report: StoreReport) -> list[_ShardTask]:
    """One task per (slide, shard): O(shards) small records."""
    t = store.table
    url, size = store.loc.url, store.shard_size
    recorded = _checksum_bytes(store.loc)
    tasks = []
    for s, slide in enumerate(t.slides):
        n, start, row = int(t.n_tiles[s]), int(t.tile_start[s]), int(t.row_start[s])
        if n == 0:
            continue
        slide_id = str(slide.get("slide_id", ""))
        checksummed = t.checksummed is not None and bool(t.checksummed[s])
        if checksummed and (start + n) * tbl.CHECKSUM_DTYPE.itemsize > recorded:
            checksummed = False
            reason = f"its tile checksums are missing from tables/tile/{tbl.CHECKSUM_FILE}"
            report.damaged.append(Damage(url, s, slide_id, None, None, reason))
        report.checksummed += n if checksummed else 0
        for first in range(0, n, size):
            count = min(size, n - first)
            tasks.append(_ShardTask(url, store.codec, size, (row + first) // size,
                                    (row + first) % size, count, s, slide_id, first, start + first,
                                    checksummed, decode))  # fmt: skip
    return tasks


def _checksum_bytes(loc: layout.Location) -> int:
    key = f"{layout.TABLES}/{tbl.TILE_FOLDER}/{tbl.CHECKSUM_FILE}"
    try:
        return loc.size(key) if loc.exists(key) else 0
    except OSError:
        return 0


_LOCATIONS: dict[str, layout.Location] = {}


def _check_shard(task: _ShardTask) -> tuple[list[Damage], int]:
    """The damaged tiles of one shard (runs in a worker process)."""
    loc = _LOCATIONS.get(task.url)
    if loc is None:
        loc = _LOCATIONS[task.url] = layout.Location.parse(task.url)
    key = layout.shard_key(task.shard)
    found: list[Damage] = []

    def damaged(j: int, reason: str) -> None:
        found.append(Damage(task.url, task.slide, task.slide_id, task.first_position + j,
                            task.first_tile + j, reason))  # fmt: skip

    def all_damaged(reason: str) -> tuple[list[Damage], int]:
        for j in range(task.count):
            damaged(j, reason)
        return found, task.count

    checksums = None
    if task.checksummed:
        checksums = tbl.read_checksums(loc, task.first_tile, task.count)
    try:
        data = loc.read_bytes(key)
    except FileNotFoundError:
        return all_damaged(f"shard file {key} is missing")
    except OSError as err:
        return all_damaged(f"shard file {key} cannot be read ({err})")
    tail = task.shard_size * 16 + 4
    try:
        index = layout.parse_shard_index(data[-tail:], task.shard_size, key)
    except ScratchpathError:
        return all_damaged(
            f"shard file {key} is truncated or its index damaged ({len(data)} bytes, index "
            "unreadable)"
        )
    payload = len(data) - tail
    for j in range(task.count):
        offset, nbytes = (int(v) for v in index[task.first_slot + j])
        if nbytes == int(layout.EMPTY):
            damaged(j, f"no entry in the index of shard file {key}")
            continue
        if offset + nbytes > payload:
            damaged(j, f"its bytes lie past the end of shard file {key} (truncated)")
            continue
        blob = data[offset : offset + nbytes]
        if checksums is not None and google_crc32c.value(blob) != int(checksums[j]):
            damaged(j, f"its bytes in shard file {key} differ from those committed (CRC-32C)")
            continue
        if task.decode or checksums is None:
            reason = _decode_problem(task.codec, blob)
            if reason:
                damaged(j, f"{reason} (shard file {key})")
    return found, task.count


def _decode_problem(codec: TileCodec, blob: bytes) -> str:
    try:
        tile = codec.decode(blob)
    except Exception as err:  # any decoder failure is damage, whatever the library raises
        return f"does not decode ({_reason(err)})"
    expected = (codec.tile_size, codec.tile_size, 3)
    if tuple(tile.shape) != expected:
        return f"decodes to shape {tuple(tile.shape)}, not {expected}"
    return ""


def _check_table(store: _OneStore) -> list[Damage]:
    """Slides whose table entries differ from what their commit line recorded."""
    t = store.table
    found = []
    if store.format_version < 2:  # format-1 digests are computed from the table itself
        return found
    try:
        columns = {key: t.columns[key] for key in tbl.TABLE_DTYPES}
    except ScratchpathError as err:
        return [Damage(store.loc.url, -1, "", None, None, str(err))]
    for s, slide in enumerate(t.slides):
        start, n = int(t.tile_start[s]), int(t.n_tiles[s])
        digest = hashlib.sha256()
        for key, (dtype, _) in tbl.TABLE_DTYPES.items():
            digest.update(np.ascontiguousarray(columns[key][start : start + n], dtype))
        if digest.hexdigest() != t.digests[s]:
            slide_id = str(slide.get("slide_id", ""))
            wrong = np.flatnonzero(columns["slide_index"][start : start + n] != s)
            for position in wrong.tolist():
                found.append(Damage(store.loc.url, s, slide_id, position, start + position,
                                    "its table entry names another slide"))  # fmt: skip
            found.append(Damage(store.loc.url, s, slide_id, None, None,
                                "its tile table entries differ from those committed (sha256 of "
                                "the slide's rows in tables/tile/*.bin)"))  # fmt: skip
    return found


def default_workers() -> int:
    """Worker processes by default: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
