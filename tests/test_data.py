"""PatchDataModule and its batch sampler, on a patch store built from real H&E tiles."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from scratchpath.data import BatchRequest, DistributedBatchSampler, PatchDataModule, ViewBatches
from scratchpath.errors import ScratchpathError
from scratchpath.store import PatchStore, StoreWriter
from scratchpath.views import MultiCrop, TwoViews
from scratchpath.views.params import N_PARAMS

# Real LC25000 lung tiles grouped into "slides" of unequal size (the sizes make the tile count
# not divisible by typical batch sizes); shards of 4 tiles, so a slide spans several shards.
SLIDE_SIZES = (17, 13, 11, 8, 6, 5)
N_TILES = sum(SLIDE_SIZES)  # 60
SHARD_SIZE = 4


def _tissue_fraction(tile: np.ndarray) -> float:
    # Stained pixels: not near-white glass. Real values vary between tiles, which the filter needs.
    return float((tile.min(axis=2) < 200).mean())


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory, tiles_dir: Path) -> Path:
    files = sorted((tiles_dir / "lc25000_lung_224").glob("*/*.jpeg"))[::12][:N_TILES]
    tiles = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    path = tmp_path_factory.mktemp("data") / "lung.zarr"
    with StoreWriter(path, tile_size=224, shard_size=SHARD_SIZE) as writer:
        start = 0
        for number, size in enumerate(SLIDE_SIZES):
            part = tiles[start : start + size]
            record = {
                "source": str(files[start]),
                "slide_id": f"slide{number}",
                "sha256": hashlib.sha256(f"slide{number}".encode()).hexdigest(),
                "mpp": 0.5,
            }
            slide = writer.begin_slide(record)
            slide.add(
                part,
                x=np.arange(size) * 224,
                y=np.zeros(size),
                mpp=np.full(size, 0.5),
                tissue_fraction=np.array([_tissue_fraction(t) for t in part]),
            )
            slide.commit()
            start += size
    return path


@pytest.fixture(scope="module")
def lung_tiles(tiles_dir: Path) -> np.ndarray:
    files = sorted((tiles_dir / "lc25000_lung_224").glob("*/*.jpeg"))[::12][:16]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


@pytest.fixture(scope="module")
def store(store_path: Path) -> PatchStore:
    return PatchStore(store_path)


def _sampler(store: PatchStore, **kwargs) -> DistributedBatchSampler:
    kwargs.setdefault("batch_size", 8)
    return DistributedBatchSampler.from_store(store, **kwargs)


def _views() -> TwoViews:
    return TwoViews(output_size=32)


def _datamodule(store_path: Path, **kwargs) -> PatchDataModule:
    kwargs.setdefault("views", _views())
    kwargs.setdefault("batch_size", 8)
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("pin_memory", False)
    dm = PatchDataModule(stores=[str(store_path)], **kwargs)
    dm.setup("fit")
    return dm


class _FakeTable:
    """Only the tile table the sampler reads: a synthetic store at a scale real data lacks."""

    def __init__(self, n: int, tiles_per_slide: int, shard_size: int) -> None:
        self.tiles = {
            "slide_index": np.arange(n) // tiles_per_slide,
            "tissue_fraction": np.ones(n, np.float32),
        }
        self.chunk_ids = np.arange(n) // shard_size

    def __len__(self) -> int:
        return len(self.chunk_ids)


# -- sampler: order -------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", ["tile", "shard"])
def test_order_is_the_same_for_the_same_seed_and_epoch(store: PatchStore, shuffle: str) -> None:
    first = _sampler(store, seed=3, shuffle=shuffle, shuffle_buffer=16).batches(5)
    second = _sampler(store, seed=3, shuffle=shuffle, shuffle_buffer=16).batches(5)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("shuffle", ["tile", "shard"])
def test_order_changes_with_epoch_and_seed(store: PatchStore, shuffle: str) -> None:
    sampler = _sampler(store, seed=3, shuffle=shuffle, shuffle_buffer=16)
    other_seed = _sampler(store, seed=4, shuffle=shuffle, shuffle_buffer=16)
    assert not np.array_equal(sampler.epoch_order(0), sampler.epoch_order(1))
    assert not np.array_equal(sampler.epoch_order(0), other_seed.epoch_order(0))


def test_iteration_yields_the_planned_batches_of_the_set_epoch(store: PatchStore) -> None:
    sampler = _sampler(store)
    sampler.set_epoch(2)
    requests = list(sampler)
    assert [r.epoch for r in requests] == [2] * len(sampler)
    np.testing.assert_array_equal(np.stack([r.indices for r in requests]), sampler.batches(2))


# -- sampler: DDP split ---------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", ["tile", "shard"])
def test_two_ranks_padded_cover_every_tile_with_equal_batch_counts(
    store: PatchStore, shuffle: str
) -> None:
    # drop_last=False: 60 tiles, 2 ranks x 8 -> 4 batches each; the 4 padding slots repeat the
    # first tiles of the epoch order, every other tile is read exactly once.
    ranks = [
        _sampler(store, rank=r, world_size=2, shuffle=shuffle, shuffle_buffer=16, drop_last=False)
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 4
    seen = np.concatenate([s.batches(1).ravel() for s in ranks])
    counts = np.bincount(seen, minlength=N_TILES)
    assert (counts >= 1).all()
    padded = ranks[0].epoch_order(1)[: len(seen) - N_TILES]
    np.testing.assert_array_equal(np.flatnonzero(counts == 2), np.sort(padded))


@pytest.mark.parametrize("shuffle", ["tile", "shard"])
def test_two_ranks_dropping_read_disjoint_tiles(store: PatchStore, shuffle: str) -> None:
    # drop_last=True: 60 // 16 = 3 batches each; the 12 leftover tiles change with the epoch.
    ranks = [
        _sampler(store, rank=r, world_size=2, shuffle=shuffle, shuffle_buffer=16) for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 3
    for epoch in (0, 1):
        seen = np.concatenate([s.batches(epoch).ravel() for s in ranks])
        assert len(np.unique(seen)) == len(seen) == 48
    left_out = [np.setdiff1d(np.arange(N_TILES), ranks[0].epoch_order(e)[:48]) for e in (0, 1)]
    assert not np.array_equal(left_out[0], left_out[1])


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_yield_equal_batch_counts_when_tiles_do_not_divide(drop_last: bool) -> None:
    table = _FakeTable(n=1003, tiles_per_slide=37, shard_size=16)
    counts = []
    for rank in range(3):
        sampler = DistributedBatchSampler.from_store(
            table, batch_size=16, rank=rank, world_size=3, shuffle="shard", drop_last=drop_last
        )
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(len(b.indices) == 16 for b in batches)
        counts.append(len(batches))
    assert counts == [1003 // 48 if drop_last else -(-1003 // 48)] * 3


# -- sampler: shard mode, filters -------------------------------------------------------------
def test_shard_mode_without_buffer_reads_shard_after_shard(store: PatchStore) -> None:
    order = _sampler(store, shuffle="shard", shuffle_buffer=1).epoch_order(0)
    shards = store.chunk_ids[order]
    runs = 1 + np.count_nonzero(shards[1:] != shards[:-1])
    assert runs == len(np.unique(store.chunk_ids))  # each shard visited once, in one run
    assert np.array_equal(np.sort(order), np.arange(N_TILES))


def test_shard_mode_buffer_mixes_within_the_buffer_only(store: PatchStore) -> None:
    sampler = _sampler(store, shuffle="shard", shuffle_buffer=16)
    unbuffered = _sampler(store, shuffle="shard", shuffle_buffer=1).epoch_order(0)
    order = sampler.epoch_order(0)
    for start in range(0, N_TILES, 16):  # same shard sequence, permuted inside each block
        block = slice(start, start + 16)
        assert sorted(order[block]) == sorted(unbuffered[block])
    assert not np.array_equal(order, unbuffered)


def test_max_tiles_per_slide_caps_slides_with_a_new_subset_each_epoch(store: PatchStore) -> None:
    sampler = _sampler(store, max_tiles_per_slide=6, drop_last=False)
    slide = store.tiles["slide_index"]
    per_epoch = [np.unique(sampler.batches(e).ravel()) for e in (0, 1)]
    expected = sum(min(size, 6) for size in SLIDE_SIZES)  # 35
    assert sampler.tiles_per_epoch == expected
    for tiles in per_epoch:
        assert np.bincount(slide[tiles]).max() == 6
    assert not np.array_equal(per_epoch[0], per_epoch[1])


def test_min_tissue_excludes_tiles_below_the_threshold(store: PatchStore) -> None:
    fraction = store.tiles["tissue_fraction"]
    threshold = float(np.median(fraction))
    sampler = _sampler(store, min_tissue=threshold, batch_size=4, drop_last=False)
    seen = np.unique(sampler.batches(0).ravel())
    np.testing.assert_array_equal(seen, np.flatnonzero(fraction >= threshold))


def test_resume_skips_the_consumed_batches_once(store: PatchStore) -> None:
    sampler = _sampler(store)
    sampler.set_epoch(3)
    sampler.resume(3, 2)
    resumed = [r.indices for r in sampler]
    np.testing.assert_array_equal(np.stack(resumed), sampler.batches(3)[2:])
    assert len(list(sampler)) == len(sampler)  # the next pass is whole again


def test_invalid_rank_is_a_clear_error(store: PatchStore) -> None:
    with pytest.raises(ScratchpathError, match="rank"):
        _sampler(store, rank=2, world_size=2)


# -- data module: batches ---------------------------------------------------------------------
def _epoch(dm: PatchDataModule) -> list[dict]:
    return list(dm.train_dataloader())


def test_batches_hold_uint8_views_and_int64_indices(store_path: Path) -> None:
    views = MultiCrop(global_size=32, local_size=16, n_global_crops=2, n_local_crops=2)
    batch = next(iter(_datamodule(store_path, views=views).train_dataloader()))
    assert [tuple(v.shape) for v in batch["views"]] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
    assert all(v.dtype == torch.uint8 for v in batch["views"])
    assert batch["index"].dtype == torch.int64 and batch["index"].shape == (8,)


def test_two_workers_give_the_same_batches_as_the_main_process(store_path: Path) -> None:
    main = _epoch(_datamodule(store_path, num_workers=0))
    workers = _epoch(_datamodule(store_path, num_workers=2))
    assert len(main) == len(workers) == N_TILES // 8
    for a, b in zip(main, workers, strict=True):
        assert torch.equal(a["index"], b["index"])
        assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"], strict=True))


def test_views_of_a_tile_do_not_depend_on_its_rank_or_batch(store_path: Path) -> None:
    # The whole epoch on one rank versus the first batch of rank 1 of two: other batches.
    dm = _datamodule(store_path)
    single = {int(i): v for b in _epoch(dm) for i, v in zip(b["index"], b["views"][0], strict=True)}
    rank1 = dm.make_sampler(rank=1, world_size=2)
    batch = ViewBatches(dm.store, dm.views, seed=0)[next(iter(rank1))]
    compared = 0
    for index, view in zip(batch["index"], batch["views"][0], strict=True):
        if int(index) in single:  # the single-rank epoch drops 4 of the 60 tiles
            assert torch.equal(view, single[int(index)])
            compared += 1
    assert compared >= 4


def test_the_epoch_of_a_batch_request_picks_the_progressive_view_size(store_path: Path) -> None:
    views = TwoViews(output_size=32, low_res_size=16, low_res_epochs=1)
    dm = _datamodule(store_path, views=views)
    dataset = ViewBatches(dm.store, dm.views, seed=0)
    indices = list(range(8))
    assert dataset[(0, indices)]["views"][0].shape[-1] == 16
    assert dataset[(1, indices)]["views"][0].shape[-1] == 32
    assert dm.describe()["input_size"] == 32


def test_dataset_pickles_by_store_path_and_reads_the_same_tiles(
    store_path: Path, store: PatchStore
) -> None:
    dm = _datamodule(store_path)
    dataset = ViewBatches(dm.store, dm.views, seed=0)
    blob = pickle.dumps(dataset)
    assert str(store_path).encode() in blob and len(blob) < 50_000  # paths, not tiles or tables
    copy = pickle.loads(blob)
    np.testing.assert_array_equal(copy.store.read([3, 1]), store.read([3, 1]))


def test_after_batch_transfer_gives_float_normalised_views(store_path: Path) -> None:
    dm = _datamodule(store_path)
    batch = next(iter(dm.train_dataloader()))
    out = dm.on_after_batch_transfer(batch, 0)
    mean = torch.tensor(dm.views.mean).view(1, 3, 1, 1)
    std = torch.tensor(dm.views.std).view(1, 3, 1, 1)
    for raw, normalised in zip(batch["views"], out["views"], strict=True):
        assert normalised.dtype == torch.float32
        torch.testing.assert_close(normalised, (raw.float() / 255 - mean) / std)


def test_describe_names_each_store_with_fingerprint_and_size(
    store_path: Path, store: PatchStore
) -> None:
    info = _datamodule(store_path).describe()
    assert info["stores"] == [
        {"path": str(store_path), "fingerprint": store.fingerprint, "n_tiles": N_TILES}
    ]
    assert info["tile_size"] == 224 and info["mpp"] == pytest.approx(0.5)
    assert info["input_size"] == 32  # the views' side: what export and eval resize tiles to
    assert tuple(info["mean"]) == tuple(_views().mean)


def test_batch_larger_than_the_data_is_a_clear_error(store_path: Path) -> None:
    with pytest.raises(ScratchpathError, match="batch_size"):
        _datamodule(store_path, batch_size=64).train_dataloader()


# -- data module: resume through Lightning ----------------------------------------------------
class _RecordingModule(L.LightningModule):
    """A linear layer on the views' mean colour; records the tile indices of every step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: list[list[int]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["index"].tolist())
        assert batch["views"][0].dtype == torch.float32  # normalised by on_after_batch_transfer
        return self.layer(batch["views"][0].mean(dim=(2, 3))).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(store_path: Path, root: Path, ckpt_path: Path | None = None, workers: int = 0):
    # 60 tiles / batch 15 = 4 batches per epoch; 10 steps span epochs 0, 1 and half of 2.
    module = _RecordingModule()
    checkpoints = ModelCheckpoint(
        dirpath=root, filename="{step}", every_n_train_steps=2, save_top_k=-1
    )
    trainer = L.Trainer(
        max_steps=10,
        accelerator="cpu",
        logger=False,
        callbacks=[checkpoints],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )
    dm = PatchDataModule(
        stores=[str(store_path)], views=_views(), batch_size=15, num_workers=workers,
        pin_memory=False, seed=7,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.seen


@pytest.fixture(scope="module")
def uninterrupted(store_path: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("uninterrupted")
    return _fit(store_path, root), root


@pytest.mark.slow
@pytest.mark.parametrize(("step", "workers"), [(2, 0), (4, 2), (6, 0)])
def test_resume_continues_with_the_next_batch(
    store_path: Path, tmp_path: Path, uninterrupted, step: int, workers: int
) -> None:
    # step 2: mid-epoch 0; step 4: end of epoch 0 (with prefetching workers); step 6: mid-epoch 1
    seen, root = uninterrupted
    assert len(seen) == 10
    resumed = _fit(store_path, tmp_path, root / f"step={step}.ckpt", workers)
    assert resumed == seen[step:]


class _RankRecordingModule(_RecordingModule):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def on_train_end(self) -> None:
        np.save(self.out / f"rank{self.global_rank}.npy", np.array(self.seen))


@pytest.mark.slow
def test_ddp_ranks_read_disjoint_equal_shares(store_path: Path, tmp_path: Path) -> None:
    # Two CPU processes (gloo) with Lightning's default use_distributed_sampler=True: the planned
    # sampler must survive (not be replaced) and the ranks must split each epoch between them.
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    dm = PatchDataModule(
        stores=[str(store_path)], views=_views(), batch_size=7, num_workers=0, pin_memory=False
    )
    trainer.fit(_RankRecordingModule(tmp_path), datamodule=dm)
    ranks = [np.load(tmp_path / f"rank{r}.npy") for r in (0, 1)]
    assert ranks[0].shape == ranks[1].shape == (N_TILES // 14, 7)
    expected = [dm.make_sampler(rank=r, world_size=2).batches(0) for r in (0, 1)]
    np.testing.assert_array_equal(ranks[0], expected[0])
    np.testing.assert_array_equal(ranks[1], expected[1])
    assert len(np.intersect1d(ranks[0], ranks[1])) == 0


def test_unknown_shuffle_mode_is_a_clear_error(store_path: Path) -> None:
    with pytest.raises(ScratchpathError, match="shuffle"):
        _datamodule(store_path, shuffle="random").train_dataloader()


def _transfer(dm: PatchDataModule, batch: dict) -> list[torch.Tensor]:
    """What Lightning does with a host batch on a CPU trainer: before, (move), after."""
    batch = {k: v for k, v in batch.items()}  # the hooks pop keys: keep the caller's batch
    return dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)["views"]


def test_device_path_jpeg_workers_send_only_the_encoded_bytes(
    store_path: Path, store: PatchStore
) -> None:
    from scratchpath.data.module import EncodedTiles

    dm = _datamodule(store_path, views=TwoViews(output_size=32, device_augment=True))
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"encoded", "index", "view_params"}
    assert isinstance(batch["encoded"], EncodedTiles)
    assert batch["view_params"].dtype == torch.float32  # the views' parameters, per tile
    assert tuple(batch["view_params"].shape) == (2, 8, N_PARAMS)
    encoded = batch["encoded"]
    assert encoded.data.dtype == torch.uint8 and encoded.data.ndim == 1
    blobs = store.read_encoded_batch(batch["index"].numpy())
    assert encoded.sizes == tuple(len(b) for b in blobs)
    assert encoded.data.numpy().tobytes() == b"".join(blobs)
    # Decoded batched by torchvision: the store's own decoder's pixels.
    decoded = encoded.decode("cpu").permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(decoded, store.read(batch["index"].numpy()))
    views = _transfer(dm, batch)
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2
    assert all(v.dtype == torch.float32 for v in views)


def test_encoded_tiles_pin_and_stay_on_the_host_in_lightning_transfers() -> None:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from scratchpath.data.module import EncodedTiles

    encoded = EncodedTiles.from_blobs([b"ab", b"cde"])
    moved = move_data_to_device({"encoded": encoded, "index": torch.arange(2)}, "cpu")
    assert moved["encoded"] is encoded  # not a tensor / sequence / dataclass: left alone
    assert encoded.data.tolist() == list(b"abcde") and encoded.sizes == (2, 3)


def test_jpeg_decode_handles_444_and_420_chroma(lung_tiles: np.ndarray) -> None:
    import imagecodecs

    from scratchpath.data.module import EncodedTiles

    tiles = lung_tiles[:2]
    for subsampling in ("444", "420"):
        blobs = [
            bytes(imagecodecs.jpeg8_encode(t, level=90, subsampling=subsampling)) for t in tiles
        ]
        decoded = EncodedTiles.from_blobs(blobs).decode("cpu").permute(0, 2, 3, 1).numpy()
        expected = np.stack([imagecodecs.jpeg8_decode(b) for b in blobs])
        np.testing.assert_array_equal(decoded, expected)


def test_device_path_lossless_store_decodes_in_the_workers(
    tmp_path: Path, lung_tiles: np.ndarray
) -> None:
    path = tmp_path / "zstd.zarr"
    with StoreWriter(path, tile_size=224, shard_size=SHARD_SIZE, codec="zstd") as writer:
        slide = writer.begin_slide({"source": "x", "slide_id": "s", "sha256": "0" * 64, "mpp": 0.5})
        n = 16
        slide.add(
            lung_tiles[:n], x=np.arange(n) * 224, y=np.zeros(n), mpp=np.full(n, 0.5),
            tissue_fraction=np.ones(n),
        )  # fmt: skip
        slide.commit()
    dm = _datamodule(path, views=MultiCrop(global_size=32, local_size=16, n_local_crops=2))
    dm.views.device_augment = True
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"tiles", "index", "view_params"} and batch["tiles"].dtype == torch.uint8
    np.testing.assert_array_equal(batch["tiles"].numpy(), lung_tiles[batch["index"].numpy()])
    shapes = [tuple(v.shape) for v in _transfer(dm, batch)]
    assert shapes == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2


def test_views_path_is_resolved_from_the_trainer_device(store_path: Path) -> None:
    dm = _datamodule(store_path, views=TwoViews(output_size=32))  # device_augment None
    assert dm.views.device_augment is None
    batch = next(iter(dm.train_dataloader()))  # no trainer: a CPU -> the CPU path
    assert dm.views.device_augment is False and "views" in batch


def test_workers_limit_opencv_and_torch_to_one_thread(store_path: Path) -> None:
    import cv2

    from scratchpath.data.module import init_worker, limit_worker_threads

    before = (cv2.getNumThreads(), torch.get_num_threads())
    try:
        limit_worker_threads(0)
        assert (cv2.getNumThreads(), torch.get_num_threads()) == (1, 1)
    finally:
        cv2.setNumThreads(before[0])
        torch.set_num_threads(before[1])
    loader = _datamodule(store_path, num_workers=1).train_dataloader()
    assert loader.worker_init_fn is init_worker and loader.persistent_workers


def test_device_path_makes_the_cpu_path_views_of_each_tile(store_path: Path) -> None:
    """Both paths draw a tile's parameters from (seed, epoch, tile): the same views, up to the
    CPU path's rounding, whatever batch the tile is in; another epoch draws others."""
    cpu = _datamodule(store_path, views=TwoViews(output_size=32, device_augment=False))
    device = _datamodule(store_path, views=TwoViews(output_size=32, device_augment=True))
    request = BatchRequest(1, np.array([5, 9, 2, 30]))
    expected = cpu.views.on_device(ViewBatches(cpu.store, cpu.views, 0)[request]["views"])
    dataset = ViewBatches(device.store, device.views, 0)
    made = _transfer(device, dataset[request])
    for a, b in zip(made, expected, strict=True):
        difference = (device.views.denormalize(a).float() - cpu.views.denormalize(b).float()).abs()
        assert difference.mean() < 1.5
    # tile 9 alone, in another batch: its views do not depend on the batch
    alone = _transfer(device, dataset[BatchRequest(1, np.array([9]))])
    assert torch.equal(alone[0][0], made[0][1])
    other_epoch = _transfer(device, dataset[BatchRequest(2, np.array([9]))])
    assert not torch.equal(other_epoch[0][0], made[0][1])


def test_workers_outlive_the_stop_signals_a_scheduler_sends_to_every_process(
    store_path: Path,
) -> None:
    """SLURM signals every process of a job step (scancel: SIGTERM; --signal: SIGUSR1); the
    training process stops the run, so its workers must still serve the batches until then."""
    import os
    import signal
    import time

    loader = _datamodule(store_path, num_workers=2).train_dataloader()
    batches = iter(loader)
    for _ in range(2):  # one batch from each worker: both have run their worker_init_fn
        next(batches)
    for pid in [worker.pid for worker in batches._workers]:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGUSR1)
    time.sleep(1)  # let the signals arrive
    for _ in range(2):  # torch's own handler would have ended them: "worker killed by signal"
        assert len(next(batches)["index"]) > 0
    assert all(w.is_alive() for w in batches._workers)
    batches._shutdown_workers()
