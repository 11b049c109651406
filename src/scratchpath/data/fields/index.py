"""``MagnificationIndex``: the tiles of every µm/px of a store, linked by slide and position.

A tile's µm/px is grouped to 2 significant digits (0.499 and 0.5 count as one), and the tiles
of one (slide, magnification) lie on the ingest grid, so the tile holding a point is found by
its grid cell with one ``searchsorted`` in a sorted array of int64 keys
``(slide * K + magnification) << 36 | cell_y << 18 | cell_x``.

At archive scale the index is built once per store state and shared: the sorted keys and the
tile each belongs to (12 bytes per tile) are written into the node-local cache
(:mod:`scratchpath.store.cache`, keyed by the store fingerprint) beside the merged table, and
every rank and DataLoader worker memory-maps them; a tile's position and extent are computed
from the table's own (mapped) x, y and µm/px columns when a batch needs them. What a process
holds privately is O(slides x magnifications). The build is vectorised and runs in chunks of
whole slides (~2M tiles: bounded memory): two passes over the µm/px column and one over x, y and
the slide column, and a stable argsort per chunk (nearly free on ingest's row-major grids).
Tables below ``IN_MEMORY_TILES`` tiles, and any table the cache refuses, are indexed in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from scratchpath.data.sampling.units import change_points
from scratchpath.errors import ScratchpathError
from scratchpath.store import cache
from scratchpath.store import table as tbl

INDEX_VERSION = 1  # bump when the files or the key layout change
_CELL_BITS = 18  # per axis: 262,144 cells of one tile side
_CELL_MASK = (1 << _CELL_BITS) - 1
_CHUNK = 1 << 21  # tiles per build step (whole slides): ~150 MB of temporaries


class MagnificationIndex:
    """Tiles of every µm/px of a store, linked by slide and physical position (module doc).

    Attributes: ``mpps`` (K,) the grouped µm/px, finest first; ``slide``, ``tile_mpp`` the
    table's columns (shared memory maps); ``tile_size``. ``origin(tiles)`` and
    ``extent(tiles)`` give tiles' top-left corner and side in µm on their slide.
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        tiles = store.tiles
        self.slide, self.tile_mpp = tiles["slide_index"], tiles["mpp"]
        self._x, self._y = tiles["x"], tiles["y"]
        self.tile_size = int(store.tile_size)
        self._slide_mpp = _level0_mpp(store)
        self.folder: Path | None = None
        n = len(self.slide)
        fingerprint = getattr(store, "fingerprint", None)
        arrays = None
        if n >= tbl.IN_MEMORY_TILES and fingerprint is not None:
            key = f"fields-{INDEX_VERSION}-{fingerprint}-{self.tile_size}"
            arrays = cache.cached_or_none(key, self._write, "µm-field index", _map)
        if arrays is None:
            arrays = self._build_in_memory()
        self._set(arrays)

    # -- geometry from the table (per queried tile, nothing per store tile) -------------------
    def origin(self, tiles: np.ndarray) -> np.ndarray:
        """(..., 2) top-left corner in µm of each tile on its slide."""
        tiles = np.asarray(tiles)
        mpp0 = self._slide_mpp[np.asarray(self.slide[tiles], np.int64)]
        return np.stack([self._x[tiles] * mpp0, self._y[tiles] * mpp0], axis=-1)

    def extent(self, tiles: np.ndarray) -> np.ndarray:
        """Side in µm of each tile."""
        return self.tile_size * np.asarray(self.tile_mpp[np.asarray(tiles)], np.float64)

    def tile_at(self, slide: np.ndarray, group: int, point: np.ndarray) -> np.ndarray:
        """Per point (µm, ``(n, 2)``), the tile of magnification ``group`` holding it, or -1."""
        slide = np.asarray(slide, np.int64)
        step = self._step[slide, group]
        found = np.full(len(slide), -1, np.int64)
        valid = np.flatnonzero(step > 0)
        if len(valid) == 0 or len(self._keys) == 0:
            return found
        scaled = point[valid] / step[valid, None]
        cell = np.floor(scaled).astype(np.int64)
        # Grid corners are rounded to level-0 px: also try the nearer neighbouring cell.
        toward = np.where(scaled - cell < 0.5, -1, 1)
        base = slide[valid] * len(self.mpps) + group
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            todo = found[valid] < 0
            if not todo.any():
                break
            keys = _keys(base, cell + toward * np.array([dx, dy]))
            pos = np.searchsorted(self._keys, keys).clip(0, len(self._keys) - 1)
            hit = np.asarray(self._keys[pos]) == keys
            candidate = np.where(hit, np.asarray(self._order[pos], np.int64), -1)
            rel = point[valid] - self.origin(candidate.clip(0))
            extent = self.extent(candidate.clip(0))[:, None]
            inside = (candidate >= 0) & ((rel >= 0) & (rel <= extent)).all(axis=1) & todo
            found[valid[inside]] = candidate[inside]
        return found

    # -- pickling: by store and cache folder (a worker maps, it does not rebuild) --------------
    def __getstate__(self) -> dict:
        return {"store": self._store, "folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        folder = state["folder"]
        if folder is None or not (Path(folder) / "meta.json").exists():
            self.__init__(state["store"])
            return
        store = state["store"]
        tiles = store.tiles
        self._store = store
        self.slide, self.tile_mpp = tiles["slide_index"], tiles["mpp"]
        self._x, self._y = tiles["x"], tiles["y"]
        self.tile_size = int(store.tile_size)
        self._slide_mpp = _level0_mpp(store)
        self._set(_map(Path(folder)))

    # -- building ----------------------------------------------------------------------------
    def _set(self, arrays: dict[str, Any]) -> None:
        self.mpps = np.asarray(arrays["mpps"], np.float64)
        self._step = np.asarray(arrays["step"], np.float64)
        self._keys, self._order = arrays["keys"], arrays["order"]
        self.folder = arrays.get("folder")

    def _build_in_memory(self) -> dict[str, Any]:
        mpps, step, chunks = self._plan_build()
        keys, order = [], []
        for k, o in chunks:
            keys.append(k)
            order.append(o)
        empty = np.zeros(0, np.int64)
        return {"mpps": mpps, "step": step, "keys": np.concatenate([empty, *keys]),
                "order": np.concatenate([empty, *order])}  # fmt: skip

    def _write(self, folder: Path) -> None:
        mpps, step, chunks = self._plan_build()
        n = len(self.slide)
        order_dtype = np.dtype("<u4") if n < 2**32 else np.dtype("<i8")
        with open(folder / "keys.bin", "wb") as keys_file, open(folder / "order.bin", "wb") as f:
            for keys, order in chunks:  # plain writes: a full disk is ENOSPC, never SIGBUS
                keys_file.write(np.ascontiguousarray(keys, "<i8").data)
                f.write(np.ascontiguousarray(order, order_dtype).data)
        np.save(folder / "step.npy", step)
        meta = {"version": INDEX_VERSION, "n": n, "mpps": mpps.tolist(),
                "order_dtype": order_dtype.str}  # fmt: skip
        (folder / "meta.json").write_text(json.dumps(meta))

    def _plan_build(self):
        """(mpps, step, generator of (sorted keys, tile of each key) per chunk of slides)."""
        n = len(self.slide)
        starts = _slide_bounds(self._store, self.slide, n)
        mpps = np.unique(np.concatenate([np.zeros(0)] + [
            _two_digits(self.tile_mpp[np.asarray(r, np.int64)]) for r in _run_starts(self, starts)
        ]))  # fmt: skip
        if not np.isfinite(mpps).all() or (mpps <= 0).any():
            raise ScratchpathError("data.fields: every tile needs a known, positive µm/px")
        if len(self._slide_mpp) * len(mpps) >= 1 << (63 - 2 * _CELL_BITS):
            raise ScratchpathError(
                f"data.fields: {len(self._slide_mpp)} slides x {len(mpps)} magnifications do "
                "not fit the index keys (at most ~1.3e8)"
            )
        step = np.zeros((len(self._slide_mpp), len(mpps)))
        return mpps, step, self._chunks(starts, mpps, step)

    def _chunks(self, starts: np.ndarray, mpps: np.ndarray, step: np.ndarray):
        k = len(mpps)
        last = None
        for lo, hi in _chunk_bounds(starts, len(self.slide)):
            slide = np.asarray(self.slide[lo:hi], np.int64)
            mpp = np.asarray(self.tile_mpp[lo:hi], np.float64)
            runs = np.flatnonzero(np.r_[True, (mpp[1:] != mpp[:-1]) | (slide[1:] != slide[:-1])])
            lengths = np.diff(np.r_[runs, hi - lo])
            run_group = np.searchsorted(mpps, _two_digits(mpp[runs]))
            extent = self.tile_size * mpp[runs]
            step[slide[runs], run_group] = extent
            mpp0 = self._slide_mpp[slide]
            cell = [np.rint(np.asarray(c[lo:hi]) * mpp0 / np.repeat(extent, lengths))
                    for c in (self._x, self._y)]  # fmt: skip
            keys = _keys(slide * k + np.repeat(run_group, lengths),
                         np.stack(cell, axis=-1).astype(np.int64))  # fmt: skip
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            if last is not None and len(keys) and keys[0] < last:
                raise ScratchpathError("data.fields: the tiles of a slide must be contiguous")
            last = keys[-1] if len(keys) else last
            yield keys, order + lo


def _keys(base: np.ndarray, cell: np.ndarray) -> np.ndarray:
    base = np.asarray(base, np.int64)
    return (
        (base << (2 * _CELL_BITS))
        | ((cell[..., 1] & _CELL_MASK) << _CELL_BITS)
        | (cell[..., 0] & _CELL_MASK)
    )


def _map(folder: Path) -> dict[str, Any]:
    """The index files of a cache folder, memory-mapped read-only."""
    meta = json.loads((folder / "meta.json").read_text())
    n = int(meta["n"])
    arrays: dict[str, Any] = {"mpps": meta["mpps"], "step": np.load(folder / "step.npy"),
                              "folder": folder}  # fmt: skip
    for name, dtype in (("keys", "<i8"), ("order", meta["order_dtype"])):
        path = folder / f"{name}.bin"
        arrays[name] = np.memmap(path, dtype, "r", shape=(n,)) if n else np.zeros(0, dtype)
    return arrays


def _two_digits(mpp: np.ndarray) -> np.ndarray:
    """µm/px rounded to 2 significant digits (0.499 -> 0.5), vectorised."""
    mpp = np.asarray(mpp, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = 10.0 ** (1 - np.floor(np.log10(mpp)))
        return np.rint(mpp * scale) / scale


def _level0_mpp(store: Any) -> np.ndarray:
    """Per slide of the store, its level-0 µm/px (NaN when unknown); slides that hold tiles
    must know theirs."""
    slides = store.slides
    out = np.full(len(slides), np.nan)
    for s in slides:
        if s.get("status") == "ok" and s.get("mpp"):
            out[int(s["slide_index"])] = float(s["mpp"])
    n_tiles = np.array([int(s.get("n_tiles", 0)) for s in slides], np.int64)
    if len(store.tiles["slide_index"]) == 0 or not np.isfinite(out[n_tiles > 0]).all():
        raise ScratchpathError(
            "data.fields: needs tiles cut from slides with a known µm/px (scratchpath ingest)"
        )
    return out


def _slide_bounds(store: Any, slide: np.ndarray, n: int) -> np.ndarray:
    """First tile of each slide run (O(slides) from a PatchStore)."""
    if hasattr(store, "slide_starts"):
        return np.unique(np.r_[0, np.asarray(store.slide_starts(), np.int64)])
    return np.r_[0, change_points(slide)]


def _chunk_bounds(starts: np.ndarray, n: int):
    """(lo, hi) of chunks of whole slides: from ``lo`` to the first slide start at or past
    ``lo + _CHUNK`` tiles (a slide larger than that is one chunk)."""
    cuts = starts[(starts > 0) & (starts < n)]
    lo = 0
    while lo < n:
        i = np.searchsorted(cuts, lo + _CHUNK, side="left")
        hi = int(cuts[i]) if i < len(cuts) else n
        yield lo, hi
        lo = hi


def _run_starts(index: MagnificationIndex, starts: np.ndarray):
    """Per chunk, the first tile of each run of one µm/px (pass 1 of the build)."""
    for lo, hi in _chunk_bounds(starts, len(index.slide)):
        mpp = np.asarray(index.tile_mpp[lo:hi], np.float64)
        yield lo + np.flatnonzero(np.r_[True, mpp[1:] != mpp[:-1]])
