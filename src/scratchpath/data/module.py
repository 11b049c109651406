"""``PatchDataModule``: SSL training batches from patch stores, DDP-correct and resumable.

The pipeline per rank::

    DistributedBatchSampler (main process)  -- plans the epoch, yields BatchRequest(epoch, indices)
      -> DataLoader(batch_size=None) workers -- ViewBatches: one store read per batch, then
      -> a host batch, pinned (uint8, the int64 indices, float32 view parameters), by path:
           CPU path:          {"views": [uint8 (B, 3, h, w)] * n_views}  views made per tile,
                              at parameters drawn from (seed, epoch, tile)
           device path, JPEG: {"encoded": EncodedTiles}  the tiles' JPEG bytes, not decoded
           device path, lossless codecs: {"tiles": uint8 (B, H, W, 3)}  decoded in the worker
           device path, both: {"view_params": float32 (V, B, 17)}  the same per-tile draw
      -> on_before_batch_transfer            -- damaged tiles the workers met: stop, or count
                                                (``skip_bad_tiles``; see data.decode)
      -> on_after_batch_transfer             -- on the device: decode the JPEG bytes batched
                                                (TorchCodec, nvJPEG on CUDA: data.decode),
                                                views.device_views (device path) or
                                                views.on_device (CPU path) -> float32 views

The device path (``views.device_augment``; ``None`` = on CUDA) leaves the workers reading bytes
and drawing the views' parameters only: ``benchmarks/bench_input.py`` measures the CPU core-ms
per tile of both paths.

Reading a whole batch with one ``store.read`` gives 1.3x the tiles/s of per-tile reads
(``benchmarks/bench_loader.py``). The sampling plan (shuffle modes, slide balance, tissue
filter, drop/pad semantics) is documented in :mod:`scratchpath.data.sampling`.

Checkpoints carry the position: :meth:`PatchDataModule.state_dict` records (epoch, batches
consumed), Lightning restores it with :meth:`~PatchDataModule.load_state_dict` before asking for
the train loader, and the sampler then skips the consumed batches of that epoch, so a resumed run
sees exactly the batches an uninterrupted run would have seen next.
"""

from __future__ import annotations

import os
import shutil
import signal
from functools import cached_property
from typing import Any, Literal

import cv2
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from scratchpath.data.batches import ViewBatches, limit_worker_threads
from scratchpath.data.decode import DamagedTiles, EncodedTiles, decode_or_name
from scratchpath.data.fields import FieldsOfView, crop_fields
from scratchpath.data.sampling import BatchRequest, DistributedBatchSampler
from scratchpath.distributed import rank_and_world_size
from scratchpath.errors import ScratchpathError
from scratchpath.store import PatchStore
from scratchpath.views import ViewGenerator

SHARED_MEMORY = "/dev/shm"  # where DataLoader workers hand batches over (Linux)


def _tensor_bytes(batch: Any) -> int:
    """Bytes of the tensors in a host batch (dicts, lists, :class:`EncodedTiles`)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, EncodedTiles):
        return _tensor_bytes(batch.data)
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        return sum(_tensor_bytes(part) for part in batch)
    return 0


def init_worker(worker_id: int) -> None:
    """``worker_init_fn`` of the train loader: :func:`limit_worker_threads`, and SIGTERM and
    SIGUSR1 ignored. Stop signals are the training process's to act on (it saves at a step
    boundary, then shuts its workers down), but SLURM (``--signal``, ``scancel``) signals every
    process of a job step: torch's worker handler ends a worker on a SIGTERM its parent did not
    send, and SIGUSR1's default action ends a spawned one, so the run failed before saving."""
    limit_worker_threads(worker_id)
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


__all__ = ["EncodedTiles", "PatchDataModule", "ViewBatches", "limit_worker_threads"]


class _ResumableLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes mid-epoch (it does, through the position
    :class:`PatchDataModule` saves), so Lightning does not warn that it is not resumable."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class PatchDataModule(L.LightningDataModule):
    """Training batches of SSL views from one or more patch stores (opened as one).

    Args:
        stores: paths or URLs of patch stores; several are concatenated.
        views: the view generator of the objective (``TwoViews``, ``MultiCrop``, ``MAEView``).
        batch_size: tiles per batch on each device.
        num_workers: DataLoader worker processes per device (0: load in the main process).
        seed: base seed of the tile order (per epoch) and of each tile's views.
        shuffle: ``"tile"`` (global permutation, best mixing, random reads) or ``"shard"``
            (shards in random order through a shuffle buffer: sequential reads for object stores
            and network file systems); see :mod:`scratchpath.data.sampling`.
        shuffle_buffer: tiles mixed together in ``"shard"`` mode.
        max_tiles_per_slide: at most this many tiles per slide per epoch, a fresh random subset
            each epoch (None: every tile every epoch).
        min_tissue: skip tiles whose recorded tissue fraction is below this.
        pin_memory: pin host batches (uint8 only) for faster, asynchronous copies to the GPU.
        drop_last: every device gets the same number of full batches; True drops the leftover
            tiles of an epoch, False pads with repeated tiles instead.
        prefetch_factor: batches each worker loads ahead.
        mpp_weights: ``{µm/px: weight}`` for stores cut at several µm/px (``ingest --mpp 0.25
            0.5 1 2``): the share of each magnification in an epoch, e.g. ``{0.25: 1, 0.5: 1,
            1.0: 1, 2.0: 1}``; deterministic per (seed, epoch). None: every tile once per epoch.
        fields: µm-continuous views (:class:`~scratchpath.data.fields.FieldsOfView`): each
            view's field of view drawn in µm and cut from the finest stored µm/px that covers
            it; batches then also carry ``"view_mpp"`` (V, B). Its views replace the view
            generator's crops; the generator still normalises them (and, with
            ``device_augment``, applies its colour augmentation on the device).
        skip_bad_tiles: a damaged tile (empty, truncated or corrupt bytes) stops the run with
            one line naming its store, shard and tile index (False, the default), or is
            replaced by another tile of its batch, logged once and counted (True; not with
            ``fields``). See :mod:`scratchpath.data.decode`.
        max_bad_fraction: with ``skip_bad_tiles``, stop once more distinct damaged tiles than
            this fraction of the tiles a device reads per epoch have been met.
    """

    def __init__(
        self,
        stores: list[str],
        views: ViewGenerator,
        batch_size: int = 64,
        num_workers: int = 4,
        seed: int = 0,
        shuffle: Literal["tile", "shard"] = "tile",
        shuffle_buffer: int = 4096,
        max_tiles_per_slide: int | None = None,
        min_tissue: float = 0.0,
        pin_memory: bool = True,
        drop_last: bool = True,
        prefetch_factor: int = 2,
        mpp_weights: dict[float, float] | None = None,
        fields: FieldsOfView | None = None,
        skip_bad_tiles: bool = False,
        max_bad_fraction: float = 0.001,
    ) -> None:
        super().__init__()
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ScratchpathError(f"max_bad_fraction: must be in [0, 1], got {max_bad_fraction}")
        if skip_bad_tiles and fields is not None:
            raise ScratchpathError("skip_bad_tiles: not supported with data.fields (µm views)")
        if not stores:
            raise ScratchpathError("stores: at least one patch store is needed")
        if num_workers < 0:
            raise ScratchpathError(f"num_workers: must be 0 or more, got {num_workers}")
        if not 0.0 <= min_tissue <= 1.0:
            raise ScratchpathError(f"min_tissue: must be within [0, 1], got {min_tissue}")
        self.save_hyperparameters(ignore=["views", "fields"])
        if fields is not None and fields.n_views != views.n_views:
            raise ScratchpathError(
                f"data.fields: {fields.n_views} views, but the view generator makes "
                f"{views.n_views} (match n_global / n_local to it)"
            )
        if fields is not None and views.low_res_epochs:
            # µm fields crop at fields.global_size / local_size: progressive resizing of the
            # view generator would silently do nothing
            raise ScratchpathError(
                "data.fields: progressive resizing (views.low_res_epochs) is not supported "
                "with µm fields; set views.low_res_epochs: 0"
            )
        self.fields = fields
        self.stores = [str(path) for path in stores]
        self.views = views
        self.worker_init_fn = init_worker
        self._store: PatchStore | None = None
        self._sampler: DistributedBatchSampler | None = None
        self._resume_state: dict[str, Any] | None = None
        self._damaged: DamagedTiles | None = None

    @property
    def store(self) -> PatchStore:
        """All stores, opened as one (in the main process)."""
        if self._store is None:
            self._store = PatchStore(*self.stores)
            self._give_views_store_mpp(self._store)
        return self._store

    def setup(self, stage: str) -> None:
        if len(self.store) == 0:
            raise ScratchpathError(f"stores: {', '.join(self.stores)} hold no tiles")

    def make_sampler(self, rank: int, world_size: int) -> DistributedBatchSampler:
        """The batch plan of one rank (also handy to inspect what a rank will read)."""
        hp = self.hparams
        return DistributedBatchSampler.from_store(
            self.store,
            batch_size=hp.batch_size,
            rank=rank,
            world_size=world_size,
            seed=hp.seed,
            shuffle=hp.shuffle,
            shuffle_buffer=hp.shuffle_buffer,
            max_tiles_per_slide=hp.max_tiles_per_slide,
            min_tissue=hp.min_tissue,
            drop_last=hp.drop_last,
            mpp_weights=hp.mpp_weights,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world_size = rank_and_world_size()  # the trainer's process group, if any
        sampler = self.make_sampler(rank, world_size)
        if len(sampler) == 0:
            raise ScratchpathError(
                f"stores: {sampler.tiles_per_epoch} tiles per epoch (after min_tissue / "
                f"max_tiles_per_slide) fill no batch of {self.hparams.batch_size} on "
                f"{world_size} device(s); lower batch_size or set drop_last: false"
            )
        # Lightning creates the first iterator before its own set_epoch call: set it here.
        sampler.set_epoch(self._epoch())
        if self._resume_state is not None:
            self._apply_resume(sampler, self._resume_state)
            self._resume_state = None
        self._sampler = sampler
        if self._damaged is None:  # kept across epochs: a tile is counted once per run
            self._damaged = DamagedTiles(
                self.hparams.skip_bad_tiles, self.hparams.max_bad_fraction, sampler.num_samples
            )
        self.resolve_views_path()
        workers = self.hparams.num_workers
        if workers > 0 and torch.multiprocessing.get_start_method(allow_none=True) in (
            None,
            "fork",
        ):
            # Forked workers inherit OpenCV's thread count and cannot safely change it (see
            # limit_worker_threads). The training process does no OpenCV work once workers
            # make the views, so one thread costs it nothing.
            cv2.setNumThreads(1)
        dataset = ViewBatches(self.store, self.views, self.hparams.seed, self.fields)
        if workers > 0:
            self.check_shared_memory(dataset, sampler)
        return _ResumableLoader(
            dataset,
            sampler=sampler,
            batch_size=None,  # the sampler yields whole batches
            num_workers=workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=self.hparams.prefetch_factor if workers > 0 else None,
            worker_init_fn=self.worker_init_fn if workers > 0 else None,
        )

    def check_shared_memory(self, dataset: Dataset, sampler: DistributedBatchSampler) -> None:
        """Refuse to start workers whose batches would overflow /dev/shm: a worker hands each
        batch over through it, ``num_workers × prefetch_factor`` in flight (at most an epoch's
        batches) plus the one in use. Too little (Docker's default is 64 MB) hangs the loader
        after a worker fails to allocate (or kills it with a bus error); here it is one error
        line. Costs one tile's views (at the full size of progressive resizing), once per loader."""
        if not os.path.isdir(SHARED_MEMORY):
            return
        hp = self.hparams
        epoch = max(self._epoch(), self.views.low_res_epochs)
        tile = dataset[BatchRequest(epoch, sampler.batch(sampler.epoch, 0)[:1])]
        batch = _tensor_bytes(tile) * hp.batch_size
        in_flight = min(hp.num_workers * hp.prefetch_factor, len(sampler)) + 1
        free = shutil.disk_usage(SHARED_MEMORY).free
        if batch * in_flight > free:
            raise ScratchpathError(
                f"{SHARED_MEMORY}: {free / 2**20:.0f} MiB free, but {in_flight} batches of "
                f"{batch / 2**20:.1f} MiB in flight (data.num_workers × data.prefetch_factor, and "
                f"the one in use) need {batch * in_flight / 2**20:.0f} MiB; in Docker add "
                "--shm-size=16g to docker run, or lower data.num_workers, data.prefetch_factor "
                "or data.batch_size"
            )

    def resolve_views_path(self) -> bool:
        """Settle ``views.device_augment=None`` from the trainer's device (device path on CUDA,
        CPU path elsewhere, and without a trainer); returns whether the device path is used."""
        device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
        return self.views.resolve_device_augment(device)

    def _epoch(self) -> int:
        """The trainer's epoch (0 before a trainer is attached, e.g. in tests and tools)."""
        return self.trainer.current_epoch if self.trainer is not None else 0

    def damaged_tiles(self) -> DamagedTiles:
        """The run's damaged-tile bookkeeping (made by the train loader; without one, e.g. in
        tools, here on first use, against the store's size)."""
        if self._damaged is None:
            hp = self.hparams
            self._damaged = DamagedTiles(hp.skip_bad_tiles, hp.max_bad_fraction, len(self.store))
        return self._damaged

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Account for the damaged tiles the workers met (raises to stop the run)."""
        if isinstance(batch, dict) and "damaged" in batch:
            batch = dict(batch)
            damage = batch.pop("damaged")
            self.damaged_tiles().report(damage, max(len(batch.get("index", ())), 1))
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The host batch on the device -> ``{"views": float32 normalised views, "index"}``.

        Device path: JPEG bytes are decoded here (one batched TorchCodec ``decode_jpeg``,
        nvJPEG on CUDA, on a decode stream of its own: :mod:`scratchpath.data.decode`) and
        ``views.device_views`` builds every view at the parameters the worker drew per tile
        from (seed, epoch, tile), as for the CPU views: reproducible, different on every rank
        (ranks read disjoint tiles) and exactly resumed. No step of it waits for the device.
        """
        if not isinstance(batch, dict):
            return batch
        if "field_tiles" in batch:  # fields.on_device: crop here
            views = crop_fields(batch.pop("field_tiles"), batch.pop("field_source"),
                                batch.pop("field_boxes"), self.fields.sizes)  # fmt: skip
            batch = {**batch, "views": views}
        if "encoded" in batch or "tiles" in batch:
            device = batch["index"].device
            if "encoded" in batch:
                encoded = batch.pop("encoded")
                tiles, damage = decode_or_name(  # (B, 3, H, W) uint8
                    encoded, device, lambda i, reason: self.store.damaged_tile(i, reason)
                )
                if damage:
                    self.damaged_tiles().report(damage, len(encoded))
            else:
                tiles = batch.pop("tiles").permute(0, 3, 1, 2)
            self.views.set_epoch(self._epoch())
            params = batch.pop("view_params", None)
            return {**batch, "views": self.views.device_views(tiles, params)}
        if "views" in batch and self.fields is not None and self.views.device_augment:
            # µm fields are already cropped: the device path adds D4 and colour to them.
            params = batch.pop("view_params", None)
            return {**batch, "views": self.views.augment_views(batch["views"], params)}
        if "views" in batch:
            return {**batch, "views": self.views.on_device(batch["views"])}
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The position in the epoch plus what the plan depends on (saved in checkpoints)."""
        if self.trainer is None or self._sampler is None:
            return {}
        epoch = self.trainer.current_epoch
        consumed = int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        if consumed >= self.trainer.num_training_batches:  # also with limit_train_batches
            epoch, consumed = epoch + 1, 0
        return {
            "epoch": epoch,
            "batches_consumed": consumed,
            "plan": self._plan_key(self._sampler.num_replicas),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the checkpoint's position; applied when the train loader is built."""
        self._resume_state = dict(state_dict) if state_dict else None

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records about its training data (see docs/architecture.md)."""
        return {
            "mpp": self.store.mpp,
            "tile_size": self.store.tile_size,
            # what the backbone saw (a CNN has no img_size of its own): export and eval use it
            "input_size": getattr(self.views, "input_size", None),
            "mean": tuple(self.views.mean),
            "std": tuple(self.views.std),
            "stores": [dict(entry) for entry in self._store_entries],
        }

    @cached_property
    def _store_entries(self) -> list[dict[str, Any]]:
        # Stores are read-only during training: hash each once, not at every checkpoint.
        entries = []
        for path in self.stores:
            single = PatchStore(path)
            entries.append(
                {"path": path, "fingerprint": single.fingerprint, "n_tiles": len(single)}
            )
        return entries

    def _plan_key(self, world_size: int) -> dict[str, Any]:
        hp = self.hparams
        return {
            "fingerprint": self.store.fingerprint,
            "world_size": world_size,
            "batch_size": hp.batch_size,
            "seed": hp.seed,
            "shuffle": hp.shuffle,
            "shuffle_buffer": hp.shuffle_buffer,
            "max_tiles_per_slide": hp.max_tiles_per_slide,
            "min_tissue": hp.min_tissue,
            "drop_last": hp.drop_last,
            # Only when set, so that checkpoints from before the argument existed still resume.
            **({"mpp_weights": dict(hp.mpp_weights)} if hp.get("mpp_weights") else {}),
        }

    def _apply_resume(self, sampler: DistributedBatchSampler, state: dict[str, Any]) -> None:
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        saved_plan = state.get("plan", {})
        if saved_plan != self._plan_key(sampler.num_replicas):
            # Another plan (world size, batch size, data, ...): skip as many tiles as were seen.
            old_step = saved_plan.get("world_size", 1) * saved_plan.get("batch_size", 1)
            consumed = round(consumed * old_step / (sampler.num_replicas * sampler.batch_size))
            rank_zero_warn(
                "PatchDataModule: the sampling plan changed since the checkpoint; the resumed "
                "epoch skips the same number of tiles but not the same tiles"
            )
        if consumed >= len(sampler):  # saved at the end of an epoch: the next one starts fresh
            epoch, consumed = epoch + 1, 0
        sampler.set_epoch(epoch)
        sampler.resume(epoch, consumed)

    def _give_views_store_mpp(self, store: PatchStore) -> None:
        # Crops given in µm need the store's µm/px; a recipe need not repeat it for the views.
        if getattr(self.views, "crop_microns", None) is None or self.views.mpp is not None:
            return
        if store.mpp is None:
            raise ScratchpathError(
                "views.crop_microns: the stores have no single µm/px; set views.mpp or crop_scale"
            )
        self.views.mpp = store.mpp
