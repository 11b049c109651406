"""Training callbacks: online evaluation, throughput and memory, preemption-safe checkpoints.

``scratchpath fit`` adds :class:`Throughput` and :class:`PreemptionCheckpoint` to every run;
:class:`OnlineEvaluation` is switched on from a recipe's ``trainer.callbacks`` because it needs a
labelled store. All of them are plain Lightning callbacks and work with a hand-built ``Trainer``.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
from collections import deque
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from scratchpath.errors import ScratchpathError
from scratchpath.finetune import extract_features, knn_eval, linear_probe_eval, rankme

__all__ = ["AtomicCheckpointIO", "OnlineEvaluation", "PreemptionCheckpoint", "Throughput"]


class OnlineEvaluation(L.Callback):
    """Every ``every_n_steps`` optimizer steps, probe the backbone on a labelled store.

    Logs ``online/knn_acc`` (cosine kNN, Caron et al. 2021), ``online/linear_acc`` (a quick linear
    probe on frozen, standardised features) and ``online/rankme`` (effective rank of the test
    embeddings, Garrido et al. 2023; near 1 means collapse). The probe math is
    :mod:`scratchpath.finetune`'s, so the numbers agree with ``scratchpath eval``.

    Every rank computes the same numbers on the same tiles (no collective, so no hang if ranks
    drift); the cost is a forward pass over ``max_tiles`` tiles every ``every_n_steps`` steps.

    Args:
        train_store: labelled patch store for the probe's training side.
        test_store: labelled store to score on; if None, ``test_fraction`` of ``train_store`` is
            held out, whole groups at a time when the store has groups (e.g. a slide or a
            source image), so near-duplicate tiles never straddle the split.
        test_fraction: held-out fraction when ``test_store`` is None.
        every_n_steps: evaluate when ``global_step`` is a multiple of this (and at the last step).
        k: neighbours of the kNN vote.
        temperature: kNN vote temperature.
        linear_epochs: epochs of the linear probe on cached features.
        max_tiles: cap on the tiles used per side (a seeded, class-stratified-by-chance sample).
        input_size: resize tiles to this side before the backbone (None: the ``img_size`` of a
            ViT backbone when it has a fixed one, else the tiles as stored).
        which: ``"teacher"`` probes the EMA teacher when the objective has one, else the
            online backbone; ``"student"`` always the online backbone.
        batch_size: tiles per forward pass.
        seed: seeds the split, the subsample and the linear probe.
    """

    def __init__(
        self,
        train_store: str,
        test_store: str | None = None,
        *,
        test_fraction: float = 0.3,
        every_n_steps: int = 500,
        k: int = 20,
        temperature: float = 0.07,
        linear_epochs: int = 50,
        max_tiles: int | None = 1000,
        input_size: int | None = None,
        which: Literal["teacher", "student"] = "teacher",
        batch_size: int = 128,
        seed: int = 0,
    ) -> None:
        if every_n_steps < 1:
            raise ScratchpathError(f"every_n_steps: must be >= 1, got {every_n_steps}")
        if not 0.0 < test_fraction < 1.0:
            raise ScratchpathError(f"test_fraction: must be in (0, 1), got {test_fraction}")
        self.train_store = train_store
        self.test_store = test_store
        self.test_fraction = test_fraction
        self.every_n_steps = every_n_steps
        self.k = k
        self.temperature = temperature
        self.linear_epochs = linear_epochs
        self.max_tiles = max_tiles
        self.input_size = input_size
        self.which = which
        self.batch_size = batch_size
        self.seed = seed
        self._last_step = -1
        self._sides: dict[str, tuple[Any, np.ndarray, np.ndarray]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._sides:
            return
        from scratchpath.store import PatchStore  # stores open lazily: no zarr at import time

        rng = np.random.default_rng(self.seed)
        train = _labelled_store(PatchStore(self.train_store), "train_store")
        if self.test_store is None:
            train_idx, test_idx = _group_split(train, self.test_fraction, rng)
            test = train
        else:
            test = _labelled_store(PatchStore(self.test_store), "test_store")
            train_idx, test_idx = np.arange(len(train)), np.arange(len(test))
        for name, store, idx in (("train", train, train_idx), ("test", test, test_idx)):
            if self.max_tiles is not None and len(idx) > self.max_tiles:
                idx = np.sort(rng.choice(idx, self.max_tiles, replace=False))
            self._sides[name] = (store, idx, np.asarray(store.labels)[idx])

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        step = trainer.global_step
        last = trainer.max_steps is not None and step == trainer.max_steps
        if step == self._last_step or step == 0 or (step % self.every_n_steps and not last):
            return
        self._last_step = step
        # Logged on every rank (the values are identical): ModelCheckpoint may monitor them.
        for name, value in self.evaluate(trainer, pl_module).items():
            pl_module.log(f"online/{name}", value, on_step=True, on_epoch=False)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Embed both sides with the current weights; return kNN / linear accuracy and RankMe."""
        if not self._sides:
            self.setup(trainer, pl_module, "fit")
        backbone = _probe_backbone(pl_module, self.which)
        mean, std = _normalisation(trainer)
        input_size = self.input_size or _fixed_input_size(backbone)
        features = {}
        with trainer.precision_plugin.forward_context():
            for name, (store, idx, _) in self._sides.items():
                features[name] = extract_features(
                    backbone,
                    store,
                    mean=mean,
                    std=std,
                    indices=idx,
                    batch_size=self.batch_size,
                    device=pl_module.device,
                    input_size=input_size,
                )
        train = (features["train"], self._sides["train"][2])  # (features, labels)
        test = (features["test"], self._sides["test"][2])
        knn = knn_eval(*train, *test, k=self.k, temperature=self.temperature)
        linear = linear_probe_eval(*train, *test, epochs=self.linear_epochs, seed=self.seed)
        return {
            "knn_acc": knn["accuracy"],
            "knn_balanced_acc": knn["balanced_accuracy"],
            "linear_acc": linear["accuracy"],
            "rankme": rankme(features["test"]),
        }


def _labelled_store(store: Any, field: str) -> Any:
    if store.labels is None or len(store.class_names) < 2:
        raise ScratchpathError(f"{field}: {store.paths[0]} has no labels (need >= 2 classes)")
    return store


def _group_split(
    store: Any, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``test_fraction`` of the tiles, by whole group when the store has groups."""
    groups = np.asarray(store.tile_column("group"), dtype=str)  # codes -> names
    if (groups == "").all():
        groups = np.arange(len(store)).astype(str)
    unique = rng.permutation(np.unique(groups))
    held_out = unique[: max(1, round(test_fraction * len(unique)))]
    is_test = np.isin(groups, held_out)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _probe_backbone(pl_module: L.LightningModule, which: str) -> nn.Module:
    teacher = getattr(pl_module, "teacher_backbone", None)
    if which == "teacher" and isinstance(teacher, nn.Module):
        return teacher
    return pl_module.backbone


def _normalisation(trainer: L.Trainer) -> tuple[tuple[float, ...], tuple[float, ...]]:
    datamodule = trainer.datamodule
    if datamodule is not None and hasattr(datamodule, "describe"):
        description = datamodule.describe()
        return tuple(description["mean"]), tuple(description["std"])
    from scratchpath.augment import HE_MEAN, HE_STD

    return tuple(HE_MEAN), tuple(HE_STD)


def _fixed_input_size(backbone: nn.Module) -> int | None:
    """The side a ViT with a fixed patch grid expects; None when any size works."""
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is None or getattr(patch_embed, "dynamic_img_size", False):
        return None
    img_size = getattr(patch_embed, "img_size", None)
    return int(img_size[0]) if img_size else None


class Throughput(L.Callback):
    """Log training speed and memory, averaged over the last ``window`` batches.

    ``perf/images_per_s`` counts every view of every sample (two for SimCLR, 2 + n_local for
    DINO) over all ranks, ``perf/samples_per_s`` the source tiles; ``perf/step_time_s`` is the wall
    time per batch including data waiting, ``perf/data_wait_s`` the part spent waiting for the
    loader (and in other callbacks). Memory: ``perf/max_cuda_memory_gb`` (peak allocated by
    torch) on CUDA, else ``perf/peak_rss_gb`` (peak resident memory of this process). No CUDA
    synchronisation is added: over a window, wall time between batch ends is the real rate.
    """

    def __init__(self, window: int = 50) -> None:
        if window < 1:
            raise ScratchpathError(f"window: must be >= 1, got {window}")
        self.window = window
        self._batches: deque[tuple[float, int, int, float]] = deque(maxlen=window)
        self._last_end: float | None = None
        self._wait = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batches.clear()
        self._last_end = None  # the first batch pays for warm-up: not measured

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        self._wait = 0.0 if self._last_end is None else time.perf_counter() - self._last_end

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        now = time.perf_counter()
        last, self._last_end = self._last_end, now
        if last is None:
            return
        views = batch["views"]
        images = sum(int(v.shape[0]) for v in views)
        self._batches.append((now - last, images, int(views[0].shape[0]), self._wait))
        seconds, images, samples, wait = (
            sum(column) for column in zip(*self._batches, strict=True)
        )
        n, world = len(self._batches), trainer.world_size
        metrics = {
            "perf/images_per_s": images * world / seconds,
            "perf/samples_per_s": samples * world / seconds,
            "perf/step_time_s": seconds / n,
            "perf/data_wait_s": wait / n,
            **_memory_metrics(pl_module.device),
        }
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)


def _memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"perf/max_cuda_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"perf/peak_rss_gb": peak / (2**30 if sys.platform == "darwin" else 2**20)}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on local disks.

    Lightning writes through an fsspec transaction whose temporary file lives in the system temp
    folder; when that is another file system than the run folder (local ``/tmp``, checkpoints on
    Lustre or NFS) the final move is a copy, and a kill during it leaves a truncated ``.ckpt``.
    Here the bytes go to ``<name>.tmp-<pid>`` beside the target, are fsynced, then
    ``os.replace``-d over it. Remote URLs keep Lightning's own writer (object stores put whole
    objects).
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)


class PreemptionCheckpoint(L.Callback):
    """Write a resumable ``last.ckpt`` when the job is told to stop, then stop cleanly.

    On SIGTERM (spot/preemptible VMs, Kubernetes, ``scancel``) Lightning already sets
    ``trainer.received_sigterm`` and raises ``SIGTERMException`` after the current batch; this
    callback saves the checkpoint just before that, at the end of the batch. Other ``signals``
    (SIGUSR1 by default, what ``#SBATCH --signal=SIGUSR1@90`` sends) set a flag checked at the end
    of each batch, then ``trainer.should_stop`` ends the run after the save. Under SLURM with
    Lightning's auto-requeue the requeue signal stays Lightning's (it writes ``hpc_ckpt_*.ckpt``,
    requeues the job, and the requeued run resumes from it on its own).

    The decision is all-reduced across ranks, so every rank saves and stops at the same step. It
    also makes all checkpoint writes of the run atomic (:class:`AtomicCheckpointIO`), and writes
    ``last.ckpt`` when training ends at ``max_steps`` mid-epoch, which ``ModelCheckpoint`` skips.

    Resume with ``scratchpath fit ... --ckpt_path last``.

    Args:
        dirpath: folder of ``last.ckpt``; default: the ``ModelCheckpoint``'s folder, else
            ``<default_root_dir>/checkpoints``.
        signals: signal names that request a checkpoint-and-stop.
    """

    def __init__(
        self, dirpath: str | None = None, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
    ) -> None:
        unknown = [name for name in signals if not hasattr(signal, name)]
        if unknown:
            raise ScratchpathError(f"signals: unknown signal name(s) {unknown}")
        self.dirpath = dirpath
        self.signals = tuple(signals)
        self.received: int | None = None  # signal number that stopped the run
        self.saved_path: str | None = None
        self._saved_step = -1
        self._previous_handlers: dict[int, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning installs its own handlers just before training starts; ours go on top.
        environment = trainer._accelerator_connector.cluster_environment
        slurm_requeue = (
            environment.requeue_signal
            if isinstance(environment, SLURMEnvironment) and environment.auto_requeue
            else None
        )
        for name in self.signals:
            signum = getattr(signal, name)
            if signum == signal.SIGTERM or signum == slurm_requeue:
                continue  # Lightning's: received_sigterm / SLURM requeue
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        previous = self._previous_handlers.get(signum)
        if callable(previous):
            previous(signum, frame)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        sigterm = trainer.received_sigterm and "SIGTERM" in self.signals
        requested = self.received is not None or sigterm
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        if self.received is None:
            self.received = int(signal.SIGTERM) if sigterm else int(signal.SIGUSR1)
        self.save_last(trainer)
        rank_zero_info(
            f"{signal.Signals(self.received).name} received: saved step {trainer.global_step} to "
            f"{self.saved_path}; resume with --ckpt_path last"
        )
        trainer.should_stop = True

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # SIGTERM landing after our batch-end check: Lightning raises before the next batch.
        if isinstance(exception, SIGTERMException) and "SIGTERM" in self.signals:
            self.received = self.received or int(signal.SIGTERM)
            if self._saved_step != trainer.global_step:
                self.save_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = _model_checkpoint(trainer)
        already = (
            checkpoint is not None
            and getattr(checkpoint, "_last_global_step_saved", None) == trainer.global_step
        )
        if self.received is None and not already and trainer.global_step > 0:
            self.save_last(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def save_last(self, trainer: L.Trainer) -> str:
        """Save the full training state to ``last.ckpt`` (collective: call on every rank)."""
        checkpoint = _model_checkpoint(trainer)
        if self.dirpath is not None:
            path = os.path.join(self.dirpath, "last.ckpt")
        elif checkpoint is not None and checkpoint.last_model_path:
            path = checkpoint.last_model_path
        else:
            folder = checkpoint.dirpath if checkpoint is not None else None
            folder = folder or os.path.join(trainer.default_root_dir, "checkpoints")
            path = os.path.join(folder, "last.ckpt")
        if checkpoint is not None and checkpoint.save_last:
            checkpoint.last_model_path = path  # part of the saved state: resumes keep the name
        get_filesystem(path).makedirs(os.path.dirname(path), exist_ok=True)
        trainer.save_checkpoint(path, weights_only=False)  # full state: optimizer, loops, data
        self.saved_path, self._saved_step = path, trainer.global_step
        return path


def _model_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    found = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    return found[0] if found else None
