"""Damaged tiles (`data/decode.py`, the store's `jpeg_damage`): named alike on both paths,
stopped or skipped by policy.

Real LC25000 tiles are imported into a store; copies of that store hold the same tiles with
one damaged three ways (truncated to 60 %, corrupt entropy-coded data, empty). The CPU path
reads them with the store's reader (imagecodecs), the device path's workers hand over the
bytes and the device-side decode runs here on the CPU (TorchCodec's libjpeg-turbo).
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch

from scratchpath.cli import main
from scratchpath.data import PatchDataModule
from scratchpath.data import decode as decode_module
from scratchpath.data.batches import ViewBatches
from scratchpath.data.decode import DamagedTiles, EncodedTiles, refill_slots
from scratchpath.data.sampling import BatchRequest
from scratchpath.errors import DamagedTileError, ScratchpathError
from scratchpath.store import PatchStore, StoreWriter, import_tiles
from scratchpath.store.codecs import jpeg_damage
from scratchpath.views import MAEView

TILE = 64
N_TILES = 12
SHARD = 4  # tile 6 lies in shard 1
BAD = 6


def _scan_start(blob: bytes) -> int:
    """First byte of the entropy-coded data (after the start-of-scan header)."""
    at = blob.index(b"\xff\xda")
    return at + 2 + int.from_bytes(blob[at + 2 : at + 4], "big")


def _corrupt(blob: bytes) -> bytes:
    """Two bytes in the middle of the scan overwritten with 0xFF 0x4A: what a flipped byte
    pair leaves and libjpeg-turbo stops at ("Unsupported marker type 0x4a")."""
    at = (_scan_start(blob) + len(blob)) // 2
    return blob[:at] + b"\xff\x4a" + blob[at + 2 :]


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda blob: blob[: int(len(blob) * 0.6)],
    "corrupt": _corrupt,
    "empty": lambda blob: b"",
}
REASON = {"truncated": "truncated JPEG", "corrupt": "corrupt JPEG data", "empty": "empty"}


@pytest.fixture(scope="module")
def clean_blobs(tiles_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """The stored bytes of 12 real LC25000 tiles imported at 64 px (the default jpeg:90:444)."""
    root = tmp_path_factory.mktemp("clean")
    folder = root / "tiles"
    folder.mkdir()
    files = sorted((tiles_dir / "lc25000_lung_224").glob("*/*.jpeg"))
    for f in files[:: max(1, len(files) // N_TILES)][:N_TILES]:
        (folder / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    import_tiles(folder, root / "store", tile_size=TILE, use_folder_labels=False)
    store = PatchStore(root / "store")
    assert len(store) == N_TILES
    return store.read_encoded_batch(range(N_TILES))


def _store(path: Path, blobs: list[bytes]) -> Path:
    with StoreWriter(path, tile_size=TILE, shard_size=SHARD) as writer:
        record = {"source": "tiles", "slide_id": "tiles", "sha256": "s"}
        with writer.begin_slide(record) as slide:
            slide.add_encoded(blobs)
    return path


def _damaged(tmp_path: Path, clean: list[bytes], kind: str, slots=(BAD,), damage=None) -> Path:
    blobs = list(clean)
    for slot in slots:
        blobs[slot] = (damage or DAMAGE[kind])(blobs[slot])
    return _store(tmp_path / f"store_{kind}", blobs)


def _device_views() -> MAEView:
    return MAEView(output_size=32, device_augment=True)


def _cpu_views() -> MAEView:
    return MAEView(output_size=32, device_augment=False)


def _device_path_error(store: Path) -> str:
    """The device path's message: worker batch -> training process (decode on this CPU)."""
    dm = PatchDataModule(stores=[str(store)], views=_device_views(), num_workers=0)
    batch = ViewBatches(PatchStore(store), dm.views, seed=0)[BatchRequest(0, np.arange(N_TILES))]
    with pytest.raises(ScratchpathError) as caught:
        batch = dm.on_before_batch_transfer(batch, 0)
        dm.on_after_batch_transfer(batch, 0)
    return str(caught.value)


# -- the check itself -----------------------------------------------------------------------


def test_jpeg_damage_accepts_every_clean_real_tile(tiles_dir: Path) -> None:
    files = sorted((tiles_dir / "lc25000_lung_224").glob("*/*.jpeg"))[::25]
    from PIL import Image

    for subsampling in ("444", "420"):
        for f in files:
            tile = np.asarray(Image.open(f).convert("RGB"))
            blob = bytes(imagecodecs.jpeg8_encode(tile, level=90, subsampling=subsampling))
            assert jpeg_damage(blob, 224) is None, f
    assert jpeg_damage(f.read_bytes(), 224) is None  # a camera JPEG as written (EXIF, 4:2:0)


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_jpeg_damage_names_each_kind_of_damage(clean_blobs: list[bytes], kind: str) -> None:
    reason = jpeg_damage(DAMAGE[kind](clean_blobs[0]), TILE)
    assert reason is not None and reason.startswith(REASON[kind])


def test_the_corrupt_sample_is_one_libjpeg_turbo_itself_rejects(clean_blobs: list[bytes]) -> None:
    # The corruption of these tests is real-world damage, not one only our check knows about.
    with pytest.raises(imagecodecs.Jpeg8Error, match="marker"):
        imagecodecs.jpeg8_decode(_corrupt(clean_blobs[0]))


def test_jpeg_damage_refuses_a_tile_of_another_size(clean_blobs: list[bytes]) -> None:
    assert (
        jpeg_damage(clean_blobs[0], TILE * 2)
        == f"JPEG of {TILE}x{TILE} px in a store of 128 px tiles"
    )


# -- named alike on both paths --------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_tile_stops_both_paths_with_the_same_line(
    clean_blobs: list[bytes], tmp_path: Path, kind: str
) -> None:
    store = _damaged(tmp_path, clean_blobs, kind)
    with pytest.raises(DamagedTileError) as cpu:
        PatchStore(store).read(np.arange(N_TILES))  # the CPU path's read
    message = str(cpu.value)
    assert message.startswith(
        f"tile {BAD} ({store}, shard tiles/c/1/0/0/0, row {BAD}) is damaged: "
    )
    assert REASON[kind] in message and "\n" not in message
    assert cpu.value.tile == BAD
    device = _device_path_error(store)
    assert device.startswith(message)  # plus the hint to skip_bad_tiles
    assert "skip_bad_tiles" in device


def test_the_cpu_path_batch_loader_stops_with_the_same_line(
    clean_blobs: list[bytes], tmp_path: Path
) -> None:
    store = _damaged(tmp_path, clean_blobs, "truncated")
    dm = PatchDataModule(stores=[str(store)], views=_cpu_views(), num_workers=0)
    batch = ViewBatches(PatchStore(store), dm.views, seed=0)[BatchRequest(0, np.arange(N_TILES))]
    with pytest.raises(ScratchpathError, match=rf"^tile {BAD} \(.*\) is damaged: truncated JPEG"):
        dm.on_before_batch_transfer(batch, 0)


def _bogus_huffman_table(blob: bytes) -> bytes:
    """A Huffman table whose code counts overflow: the structure is intact (``jpeg_damage``
    passes it), every decoder refuses it."""
    at = blob.index(b"\xff\xc4") + 5
    return blob[:at] + b"\xff" * 16 + blob[at + 16 :]


def test_a_tile_only_the_decoder_rejects_is_named_on_both_paths(
    clean_blobs: list[bytes], tmp_path: Path
) -> None:
    bogus_huffman_table = _bogus_huffman_table
    assert jpeg_damage(bogus_huffman_table(clean_blobs[BAD]), TILE) is None
    store = _damaged(tmp_path, clean_blobs, "header", damage=bogus_huffman_table)
    with pytest.raises(DamagedTileError, match="Jpeg8Error: Bogus Huffman table definition"):
        PatchStore(store).read(np.arange(N_TILES))
    device = _device_path_error(store)  # found by decoding tile by tile after the batch failed
    assert device.startswith(f"tile {BAD} ({store}, shard tiles/c/1/0/0/0, row {BAD}) is damaged")
    assert "RuntimeError: Bogus Huffman table definition" in device


def test_batches_are_decoded_tile_by_tile_only_after_a_failure(
    clean_blobs: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = decode_module.decode_on_device

    def counted(parts, device):
        calls.append(len(parts))
        return real(parts, device)

    monkeypatch.setattr(decode_module, "decode_on_device", counted)
    name = PatchStore(_store(tmp_path / "clean", clean_blobs)).damaged_tile
    clean = EncodedTiles.from_blobs(clean_blobs, range(N_TILES))
    tiles, damage = decode_module.decode_or_name(clean, torch.device("cpu"), name)
    assert calls == [N_TILES] and damage == [] and tiles.shape == (N_TILES, 3, TILE, TILE)
    calls.clear()
    blobs = list(clean_blobs)
    blobs[BAD] = _bogus_huffman_table(blobs[BAD])
    tiles, damage = decode_module.decode_or_name(
        EncodedTiles.from_blobs(blobs, range(N_TILES)), torch.device("cpu"), name
    )
    assert calls == [N_TILES] + [1] * N_TILES
    assert [tile for tile, _ in damage] == [BAD]
    torch.testing.assert_close(tiles[BAD], tiles[0])  # refilled from the first good slot


# -- skip_bad_tiles -------------------------------------------------------------------------


def test_refill_slots_takes_the_good_slots_in_turn() -> None:
    assert refill_slots([False, True, False, True, True]) == [0, 0, 2, 2, 0]
    assert refill_slots([True, True]) is None


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_a_damaged_slot_holds_another_tile_of_the_batch(
    clean_blobs: list[bytes], tmp_path: Path, path: str
) -> None:
    store = _damaged(tmp_path, clean_blobs, "corrupt", slots=(0, BAD))
    views = _device_views() if path == "device" else _cpu_views()
    dm = PatchDataModule(
        stores=[str(store)], views=views, skip_bad_tiles=True, max_bad_fraction=0.5, num_workers=0
    )
    batch = ViewBatches(PatchStore(store), views, seed=0)[BatchRequest(0, np.arange(N_TILES))]
    assert [tile for tile, _ in batch["damaged"]] == [0, BAD]
    assert batch["index"].tolist() == list(range(N_TILES))  # the planned indices (view seeds)
    if path == "device":
        blobs = EncodedTiles.parts(batch["encoded"])
        assert bytes(blobs[0].numpy()) == bytes(blobs[1].numpy()) == clean_blobs[1]
        assert bytes(blobs[BAD].numpy()) == clean_blobs[2]
    out = dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)
    assert len(out["views"][0]) == N_TILES and "damaged" not in out


def test_skip_bad_tiles_logs_each_tile_once_and_counts_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = DamagedTiles(skip=True, max_fraction=0.5, tiles_per_epoch=100)
    with caplog.at_level(logging.WARNING, logger="scratchpath.data.decode"):
        for _ in range(3):  # the same tile in three epochs
            policy.report([(7, "tile 7 (s, shard k, row 7) is damaged: empty (0 bytes)")], 4)
        policy.report([(9, "tile 9 (...) is damaged: empty (0 bytes)")], 4)
    assert policy.seen == {7, 9}
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "tile 7 (s, shard k, row 7) is damaged: empty (0 bytes)",
        "tile 9 (...) is damaged: empty (0 bytes)",
    ]


def test_skip_bad_tiles_stops_past_max_bad_fraction() -> None:
    policy = DamagedTiles(skip=True, max_fraction=0.02, tiles_per_epoch=100)
    policy.report([(1, "tile 1 damaged"), (2, "tile 2 damaged")], 8)  # 2 of 100: at the limit
    with pytest.raises(ScratchpathError, match=r"^3 damaged tiles met, more than .* 0\.02 of "
                       r"the 100 tiles per epoch \(the last: tile 3 damaged\)$"):  # fmt: skip
        policy.report([(3, "tile 3 damaged")], 8)


def test_skip_bad_tiles_stops_when_a_whole_batch_is_damaged() -> None:
    policy = DamagedTiles(skip=True, max_fraction=1.0, tiles_per_epoch=100)
    with pytest.raises(ScratchpathError, match="every tile of a batch of 2 is damaged"):
        policy.report([(1, "tile 1 damaged"), (2, "tile 2 damaged")], 2)


FIT_CONFIG = """
    seed_everything: 0
    trainer:
      accelerator: cpu
      max_steps: 3
      logger: false
      enable_progress_bar: false
      enable_model_summary: false
      default_root_dir: {root}
    model:
      class_path: scratchpath.objectives.mae.MAE
      init_args:
        backbone: vit_tiny_patch16_224
        backbone_kwargs: {{img_size: 32, patch_size: 8, depth: 1, embed_dim: 48, num_heads: 2}}
        decoder_dim: 32
        decoder_depth: 1
        decoder_heads: 2
    data:
      stores: [{store}]
      batch_size: 4
      num_workers: 1
      views:
        class_path: scratchpath.views.MAEView
        init_args: {{output_size: 32}}
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("skip", "fraction", "status"), [(False, 0.001, 2), (True, 0.001, 2), (True, 0.2, 0)]
)
def test_fit_with_a_damaged_tile_stops_with_one_line_or_skips_it(
    clean_blobs: list[bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    skip: bool,
    fraction: float,
    status: int,
) -> None:
    # Through a DataLoader worker process, as `scratchpath fit` runs it.
    store = _damaged(tmp_path, clean_blobs, "truncated")
    config = tmp_path / "fit.yaml"
    config.write_text(textwrap.dedent(FIT_CONFIG.format(root=tmp_path / "run", store=store)))
    argv = ["fit", "--config", str(config), f"--data.skip_bad_tiles={str(skip).lower()}",
            f"--data.max_bad_fraction={fraction}"]  # fmt: skip
    assert main(argv) == status
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    if status == 0:
        assert errors == []
    elif skip:  # 1 damaged tile > 0.001 x 12 tiles per epoch
        assert errors == [
            "error: 1 damaged tiles met, more than data.max_bad_fraction 0.001 of the 12 tiles "
            f"per epoch (the last: tile {BAD} ({store}, shard tiles/c/1/0/0/0, row {BAD}) is "
            f"damaged: truncated JPEG ({int(len(clean_blobs[BAD]) * 0.6)} bytes, no end-of-image "
            "marker))"
        ]
    else:
        assert len(errors) == 1
        assert errors[0].startswith(f"error: tile {BAD} ({store}, shard tiles/c/1/0/0/0, row")
