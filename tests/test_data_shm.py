"""PatchDataModule refuses DataLoader workers whose batches would overflow /dev/shm (Docker's
default 64 MB): one error line naming --shm-size instead of a bus error or a hung loader.
The real 64 MB /dev/shm of a container is exercised by tests/test_container.py."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scratchpath.data import PatchDataModule
from scratchpath.data import module as data_module
from scratchpath.errors import ScratchpathError
from scratchpath.views import MultiCrop, TwoViews
from store_helpers import write_store

BATCH, WORKERS, PREFETCH = 2, 2, 2  # 16 tiles: 8 batches an epoch
IN_FLIGHT = WORKERS * PREFETCH + 1  # batches queued by the workers + the one in use
Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory, tiles_dir: Path) -> Path:
    files = sorted((tiles_dir / "deeptexture_examples_unlabeled_256" / "unlabeled").iterdir())
    tiles = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[:16]])
    path = tmp_path_factory.mktemp("shm") / "store.zarr"
    write_store(path, tiles)
    return path


@pytest.fixture
def shm_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Set the free bytes the module sees in its shared-memory folder (here a temporary one)."""
    monkeypatch.setattr(data_module, "SHARED_MEMORY", str(tmp_path))
    real = shutil.disk_usage
    free = {"bytes": 0}

    def disk_usage(path):
        return Usage(2**40, 0, free["bytes"]) if str(path) == str(tmp_path) else real(path)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)

    def set_free(n: int) -> None:
        free["bytes"] = n

    return set_free


def _loader(store_path: Path, views, workers: int = WORKERS, batch_size: int = BATCH):
    dm = PatchDataModule(
        stores=[str(store_path)], views=views, batch_size=batch_size, num_workers=workers,
        prefetch_factor=PREFETCH, pin_memory=False,
    )  # fmt: skip
    dm.setup("fit")
    return dm.train_dataloader()


def _multicrop() -> MultiCrop:
    return MultiCrop(global_size=32, local_size=16, n_global_crops=2, n_local_crops=2)


# uint8 views of a tile: 2 × 32² + 2 × 16² pixels, 3 channels, plus its int64 tile index
MULTICROP_TILE = 3 * (2 * 32**2 + 2 * 16**2) + 8
MULTICROP_BATCH = BATCH * MULTICROP_TILE


def test_workers_are_refused_when_shared_memory_cannot_hold_the_batches_in_flight(
    store_path: Path, shm_free
) -> None:
    shm_free(MULTICROP_BATCH * IN_FLIGHT - 1)
    with pytest.raises(ScratchpathError, match=r"--shm-size=16g .*data\.num_workers") as error:
        _loader(store_path, _multicrop())
    assert "\n" not in str(error.value)


def test_workers_start_when_shared_memory_holds_the_batches_in_flight(
    store_path: Path, shm_free
) -> None:
    shm_free(MULTICROP_BATCH * IN_FLIGHT)
    batch = next(iter(_loader(store_path, _multicrop())))
    assert sum(v.numel() for v in batch["views"]) + 8 * len(batch["index"]) == MULTICROP_BATCH


def test_an_epoch_shorter_than_the_prefetch_needs_only_its_batches(
    store_path: Path, shm_free
) -> None:
    # 16 tiles in batches of 8: 2 batches an epoch, fewer than 2 workers × prefetch 2
    shm_free(8 * MULTICROP_TILE * (2 + 1))
    assert next(iter(_loader(store_path, _multicrop(), batch_size=8)))["views"]
    shm_free(8 * MULTICROP_TILE * (2 + 1) - 1)
    with pytest.raises(ScratchpathError, match="--shm-size"):
        _loader(store_path, _multicrop(), batch_size=8)


def test_loading_in_the_main_process_uses_no_shared_memory(store_path: Path, shm_free) -> None:
    shm_free(0)
    assert next(iter(_loader(store_path, _multicrop(), workers=0)))["views"]


def test_progressive_resizing_is_checked_at_the_full_view_size(store_path: Path, shm_free) -> None:
    # epoch 0 makes 16 px views, later epochs 32 px: the workers persist into those epochs
    views = TwoViews(output_size=32, low_res_size=16, low_res_epochs=1)
    full = BATCH * (3 * 2 * 32**2 + 8)
    shm_free(full * IN_FLIGHT - 1)
    with pytest.raises(ScratchpathError, match="--shm-size"):
        _loader(store_path, views)
