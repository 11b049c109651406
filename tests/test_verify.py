"""``scratchpath verify``: every damaged tile named precisely, nothing written, on real tiles."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scratchpath.cli import main
from scratchpath.store import PatchStore, layout
from scratchpath.store import table as tbl
from scratchpath.store.verify import verify_stores
from store_helpers import write_store

# 20 real tiles in 2 slides of 10, shards of 8: slide 0 in shards 0-1, slide 1 in shards 2-3.


@pytest.fixture(scope="module")
def real_tiles(tiles_dir: Path) -> np.ndarray:
    files = sorted((tiles_dir / "deeptexture_examples_unlabeled_256" / "unlabeled").iterdir())
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[:20]])


@pytest.fixture
def store(tmp_path: Path, real_tiles: np.ndarray) -> Path:
    path = tmp_path / "s.zarr"
    write_store(path, real_tiles, codec="jpeg")
    return path


def _snapshot(path: Path) -> dict[str, tuple[int, str]]:
    return {
        str(f.relative_to(path)): (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def _damaged(path: Path, **kwargs) -> list[tuple[int, int | None, str]]:
    before = _snapshot(path)
    (report,) = verify_stores([str(path)], **kwargs)
    assert _snapshot(path) == before  # read-only: nothing written, nothing touched
    return [(d.slide_index, d.position, d.reason) for d in report.damaged]


def _tile_span(path: Path, tile: int) -> tuple[Path, int, int]:
    """(shard file, offset, nbytes) of a store tile, from the shard's own index."""
    _, row = PatchStore(path).zarr_row(tile)
    shard_file = path / layout.shard_key(row // 8)
    data = shard_file.read_bytes()
    index = layout.parse_shard_index(data[-(8 * 16 + 4) :], 8, str(shard_file))
    offset, nbytes = (int(v) for v in index[row % 8])
    return shard_file, offset, nbytes


def test_an_intact_store_verifies_against_its_commit_checksums(store: Path, capsys) -> None:
    (report,) = verify_stores([str(store)])
    assert report.damaged == [] and report.tiles == report.checksummed == 20
    assert main(["verify", str(store), "--no-progress"]) == 0
    assert "20 tiles checked (all against checksums recorded at commit): 0 damaged" in (
        capsys.readouterr().out
    )


def test_a_flipped_byte_names_its_tile_only(store: Path, capsys) -> None:
    shard_file, offset, nbytes = _tile_span(store, 13)  # slide 1, position 3
    data = bytearray(shard_file.read_bytes())
    data[offset + nbytes // 2] ^= 0x10  # JPEG usually still decodes: only the checksum sees it
    shard_file.write_bytes(bytes(data))
    found = _damaged(store)
    assert [(s, p) for s, p, _ in found] == [(1, 3)]
    assert "differ from those committed (CRC-32C)" in found[0][2]
    assert main(["verify", str(store), "--no-progress", "--workers", "1"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"{store}: slide 1 (slide1) tile 3 (store tile 13): its bytes in shard file "
        f"{layout.shard_key(2)} differ from those committed (CRC-32C)"
    )
    assert out[-1].endswith(": 1 damaged")


def test_a_truncated_shard_names_every_tile_it_held(store: Path) -> None:
    shard_file = store / layout.shard_key(1)  # slide 0, positions 8 and 9
    shard_file.write_bytes(shard_file.read_bytes()[:-100])
    found = _damaged(store)
    assert [(s, p) for s, p, _ in found] == [(0, 8), (0, 9)]
    assert all("truncated" in reason for _, _, reason in found)


def test_a_missing_shard_names_every_tile_it_held(store: Path) -> None:
    (store / layout.shard_key(2)).unlink()  # slide 1, positions 0-7
    found = _damaged(store, workers=2)  # the parallel path (spawned workers)
    assert [(s, p) for s, p, _ in found] == [(1, p) for p in range(8)]
    assert all(f"shard file {layout.shard_key(2)} is missing" in r for _, _, r in found)


def test_a_changed_table_entry_names_its_slide_and_tile(store: Path) -> None:
    column = store / "tables" / tbl.TILE_FOLDER / "slide_index.bin"
    values = np.fromfile(column, "<i4")
    values[4] = 1  # tile 4 of slide 0 now claims slide 1
    values.tofile(column)
    found = _damaged(store)
    assert (0, 4, "its table entry names another slide") in found
    assert any(s == 0 and p is None and "sha256" in r for s, p, r in found)


def test_a_store_without_checksums_verifies_decodability(store: Path) -> None:
    (store / "tables" / tbl.TILE_FOLDER / tbl.CHECKSUM_FILE).unlink()
    lines = (store / "tables" / tbl.SLIDES_FILE).read_text().splitlines()
    old = [json.loads(line) for line in lines]
    for entry in old:  # as written before checksums existed
        entry["table"].pop("crc32c")
    (store / "tables" / tbl.SLIDES_FILE).write_text("".join(json.dumps(e) + "\n" for e in old))
    shard_file, offset, nbytes = _tile_span(store, 5)
    data = bytearray(shard_file.read_bytes())
    data[offset : offset + nbytes] = bytes(nbytes)  # zeroed: no longer a JPEG
    shard_file.write_bytes(bytes(data))
    (report,) = verify_stores([str(store)])
    assert report.checksummed == 0 and "for decodability" in report.summary()
    assert [(d.slide_index, d.position) for d in report.damaged] == [(0, 5)]
    assert report.damaged[0].reason.startswith("does not decode")
