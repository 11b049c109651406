"""Several stores opened as one: one tile table, built once per set of committed states.

Stores of a sharded ingestion (one per SLURM array task, 10^3 of them) are concatenated: slide
indices shifted past the earlier stores' slides, group codes re-mapped into one dictionary.
Tables of at least ``IN_MEMORY_TILES`` tiles are written once into the node-local cache
(:mod:`scratchpath.store.cache`), column by column with plain sequential writes (bounded
memory, errors as ``OSError``), and memory-mapped by every process; smaller ones, or any merge
the cache refuses, are concatenated in process memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from scratchpath.store import cache
from scratchpath.store import table as tbl

_CHUNK = 1 << 22  # tiles per write while merging: bounded memory whatever the table size


def merge_tables(tables: list[tbl.TileTable], identity: str) -> tbl.TileTable:
    """One table for several stores (``identity`` names their committed states: the cache key)."""
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

    def part(i: int, key: str, lo: int, hi: int) -> np.ndarray:
        col = tables[i].columns[key][lo:hi]
        if key == "slide_index":
            return col + np.int32(slide_offsets[i])
        if key == "group":
            return remaps[i][col]
        return col

    def build(folder: Path) -> None:
        for key, (dtype, _) in tbl.TABLE_DTYPES.items():
            with open(folder / f"{key}.bin", "wb") as f:
                for i, t in enumerate(tables):
                    for lo in range(0, len(t), _CHUNK):
                        f.write(np.ascontiguousarray(part(i, key, lo, lo + _CHUNK), dtype).data)

    columns = None
    if n >= tbl.IN_MEMORY_TILES:
        key = "table-" + hashlib.sha256(identity.encode()).hexdigest()[:24]
        mapped = cache.cached_or_none(key, build, "merged tile table", tbl.map_columns)
        if mapped is not None:
            columns = {k: v[:n] for k, v in mapped.items()}
    if columns is None:
        columns = tbl.empty_columns(n)
        for i, t in enumerate(tables):
            at = int(tile_offsets[i])
            for key in tbl.TABLE_DTYPES:
                columns[key][at : at + len(t)] = part(i, key, 0, len(t))
    slides = []
    for i, t in enumerate(tables):
        first = int(slide_offsets[i])
        slides.extend({**s, "slide_index": int(s["slide_index"]) + first} for s in t.slides)
    return tbl.TileTable(
        slides=slides,
        columns=columns,
        groups=groups,
        tile_start=np.concatenate([t.tile_start + tile_offsets[i] for i, t in enumerate(tables)]),
        row_start=np.concatenate([t.row_start for t in tables]),
        n_tiles=np.concatenate([t.n_tiles for t in tables]),
        digests=[d for t in tables for d in t.digests],
        checksummed=np.concatenate([_checksummed(t) for t in tables]),
    )


def _checksummed(t: tbl.TileTable) -> np.ndarray:
    if t.checksummed is None:
        return np.zeros(len(t.slides), bool)
    return t.checksummed
