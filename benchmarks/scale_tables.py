"""Synthetic archive-scale stores for ``bench_scale.py``: tile tables written directly, no pixels.

``write_multi_mpp_store`` writes a format-2 store of ``n`` tiles over ``n_slides`` slides the
way ``scratchpath ingest --mpp 0.25 0.5 1 2`` lays one out: each slide's tiles at 0.25, 0.5, 1
and 2 µm/px (48:12:3:1, i.e. the same tissue area at each), each magnification on its own
row-major grid with level-0 corners, a random tissue fraction per tile, 1024-tile shards with a
slide starting a fresh one, real per-slide table digests and tile checksums. With
``shards=True`` every shard file exists: hard links to a template shard of 1024 16-byte tiles
(one template per 50,000 links), so 10^5 shard files cost 10^5 links, not 1.7 GB; the reader
opens, indexes and reads them like any other; the tiles do not decode (the benchmarks read
bytes, not pixels).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

SHARD = 1024
TILE = 224
MPPS = (0.25, 0.5, 1.0, 2.0)
SHARES = np.array([48, 12, 3, 1]) / 64  # tiles per magnification: the same area at each
BLOB = b"scratchpath-tile"  # 16 bytes: every synthetic tile's stored bytes
LINKS_PER_FILE = 50_000  # ext4 allows 65,000 hard links to one file


def slide_sizes(n: int, n_slides: int) -> np.ndarray:
    sizes = np.full(n_slides, n // n_slides, np.int64)
    sizes[: n % n_slides] += 1
    return sizes


def _slide_template(size: int) -> dict[str, np.ndarray]:
    """The columns of one slide of ``size`` tiles (all µm/px), slide_index and tissue aside."""
    counts = np.floor(SHARES * size).astype(np.int64)
    counts[0] += size - counts.sum()
    width0 = max(1, int(np.ceil(np.sqrt(counts[0]))))
    xs, ys, mpps, levels = [], [], [], []
    for k, (count, mpp) in enumerate(zip(counts.tolist(), MPPS, strict=True)):
        width = max(1, -(-width0 // 2**k))
        cell = np.arange(count)
        xs.append(cell % width * TILE * 2**k)  # level-0 px of a 0.25 µm/px slide
        ys.append(cell // width * TILE * 2**k)
        mpps.append(np.full(count, mpp))
        levels.append(np.full(count, k))
    return {"x": np.concatenate(xs), "y": np.concatenate(ys), "mpp": np.concatenate(mpps),
            "level": np.concatenate(levels)}  # fmt: skip


def _group_attrs(path: Path) -> None:
    (path / "tables").mkdir(parents=True, exist_ok=True)
    attrs = {"scratchpath_format_version": 2, "tile_size": TILE, "codec": "jpeg:90:444",
             "shard_size": SHARD, "class_names": []}  # fmt: skip
    meta = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
    (path / "zarr.json").write_text(json.dumps(meta))
    (path / "tables" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))


def write_multi_mpp_store(path: Path, n: int, n_slides: int = 10_000, shards: bool = False) -> None:
    """See the module docstring."""
    import google_crc32c

    from scratchpath.store import layout
    from scratchpath.store import table as tbl

    _group_attrs(path)
    sizes = slide_sizes(n, n_slides)
    templates = {int(s): _slide_template(int(s)) for s in np.unique(sizes)}
    folder = path / "tables" / tbl.TILE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    files = {k: open(folder / f"{k}.bin", "wb") for k in tbl.TABLE_DTYPES}  # noqa: SIM115
    crc = np.uint32(google_crc32c.value(BLOB))
    rng = np.random.default_rng(0)
    lines = []
    tile_start, row_start = 0, 0
    with open(folder / tbl.CHECKSUM_FILE, "wb") as checksums:
        for s, size in enumerate(sizes.tolist()):
            t = templates[size]
            values = {"slide_index": np.full(size, s, np.int32), "x": t["x"], "y": t["y"],
                      "level": t["level"], "mpp": t["mpp"],
                      "tissue_fraction": rng.random(size, np.float32),
                      "label": np.full(size, -1, np.int16),
                      "group": np.zeros(size, np.int32)}  # fmt: skip
            digest = hashlib.sha256()
            for key, (dtype, _) in tbl.TABLE_DTYPES.items():
                data = np.ascontiguousarray(values[key], dtype).tobytes()
                digest.update(data)
                files[key].write(data)
            checksums.write(np.full(size, crc, "<u4").tobytes())
            record = {"source": f"s{s}.svs", "slide_id": f"s{s}", "sha256": f"{s:064x}",
                      "bytes": 1, "vendor": "aperio", "width": 1, "height": 1, "mpp": 0.25,
                      "status": "ok", "reason": "", "n_tiles": size, "row_start": row_start,
                      "slide_index": s}  # fmt: skip
            table = {"tile_start": tile_start, "n_tiles": size, "new_groups": [],
                     "sha256": digest.hexdigest(), "crc32c": True}  # fmt: skip
            lines.append(json.dumps({"slide": record, "table": table}, sort_keys=True) + "\n")
            tile_start += size
            row_start += -(-size // SHARD) * SHARD
    for f in files.values():
        f.close()
    (path / "tables" / tbl.SLIDES_FILE).write_text("".join(lines))
    if shards:
        data = layout.build_shard([BLOB] * SHARD, 0, SHARD)
        for shard in range(row_start // SHARD):
            template = path / "tiles" / f"template-{shard // LINKS_PER_FILE}.shard"
            if shard % LINKS_PER_FILE == 0:
                template.parent.mkdir(parents=True, exist_ok=True)
                template.write_bytes(data)
            target = path / layout.shard_key(shard)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(template, target)


# -- format 1, for the before figures of the code before issue 10 ------------------------------
def _records(sizes: np.ndarray) -> list[dict]:
    rows = np.concatenate([[0], np.cumsum(-(-sizes // SHARD) * SHARD)[:-1]])
    pairs = enumerate(zip(sizes.tolist(), rows.tolist(), strict=True))
    return [{"source": f"s{k}.svs", "slide_id": f"s{k}", "sha256": f"{k:064x}", "bytes": 1,
             "vendor": "aperio", "width": 1, "height": 1, "mpp": 0.25, "status": "ok",
             "reason": "", "n_tiles": int(n), "row_start": int(r), "slide_index": k}
            for k, (n, r) in pairs]  # fmt: skip


def write_format1_store(path: Path, n: int, n_slides: int = 10_000) -> None:
    """A format-1 store's table (one merged npz segment) of n tiles, as the old writer leaves."""
    (path / "tables").mkdir(parents=True, exist_ok=True)
    attrs = {"scratchpath_format_version": 1, "tile_size": TILE, "codec": "jpeg:90",
             "shard_size": SHARD, "class_names": []}  # fmt: skip
    (path / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs})
    )
    (path / "tables" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
    sizes = slide_sizes(n, n_slides)
    records = _records(sizes)
    slide = np.repeat(np.arange(n_slides, dtype=np.int64), sizes)
    rows = np.concatenate([np.arange(r["row_start"], r["row_start"] + r["n_tiles"])
                           for r in records])  # fmt: skip
    arrays = {"slide_index": slide, "x": np.arange(n) % 50_000 * TILE, "y": np.zeros(n, np.int64),
              "level": np.zeros(n, np.int64), "mpp": np.full(n, 0.5),
              "tissue_fraction": np.random.default_rng(0).random(n, np.float32),
              "label": np.full(n, -1, np.int64), "group": np.full(n, "", "<U1"), "row": rows,
              "slides_json": np.array(json.dumps(records, sort_keys=True))}  # fmt: skip
    np.savez(path / "tables" / f"seg-{0:010d}-{n_slides:010d}.npz", **arrays)
