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
from typing import Any, Literal, TextIO

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from scratchpath.distributed import CrossRankCheck, HostCopy, is_logging_step
from scratchpath.errors import ScratchpathError
from scratchpath.finetune import (
    extract_features,
    grouped_split,
    knn_eval,
    linear_probe_eval,
    rankme,
)

__all__ = [
    "AtomicCheckpointIO",
    "OnlineEvaluation",
    "PreemptionCheckpoint",
    "ProgressLog",
    "Throughput",
]


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
            held out by :func:`~scratchpath.finetune.grouped_split` (whole groups at a time, e.g.
            a slide or a source image, stratified by class; the split ``scratchpath eval``
            makes with the same seed), so near-duplicate tiles never straddle the split.
        test_fraction: held-out fraction when ``test_store`` is None.
        every_n_steps: evaluate when ``global_step`` is a multiple of this (and at the last step).
        k: neighbours of the kNN vote.
        temperature: kNN vote temperature.
        linear_epochs: epochs of the linear probe on cached features.
        max_tiles: cap on the tiles used per side (a seeded, class-stratified-by-chance sample).
        input_size: resize tiles to this side before the backbone (None: the ``img_size`` of a
            ViT backbone when it has a fixed one, else the side of the training views, else
            the tiles as stored).
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
            # the split of `scratchpath eval --data` (grouped, class-stratified, same seed), so
            # online and offline figures come from the same tiles
            has_groups = "group" in train.tiles
            groups = train.tile_column("group") if has_groups else np.full(len(train), "")
            train_idx, test_idx = grouped_split(
                np.asarray(train.labels), groups, test_fraction=self.test_fraction, seed=self.seed
            )
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
        input_size = self.input_size or _fixed_input_size(backbone) or _training_input_size(trainer)
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


def _training_input_size(trainer: L.Trainer) -> int | None:
    """The side of this epoch's training views (what a CNN trains at now; with progressive
    resizing the low-res side until the full one), as ``scratchpath eval`` uses at the end."""
    views = getattr(trainer.datamodule, "views", None)
    if hasattr(views, "view_size"):
        return views.view_size(0, epoch=trainer.current_epoch)
    return getattr(views, "input_size", None)


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
    The figures are Python numbers, kept on the host and logged on Lightning's logging steps
    only (every ``log_every_n_steps``): a logged number becomes a device tensor, a blocking
    host-to-device copy on a GPU, so logging them every step would cost five copies per step.
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
        if not is_logging_step(trainer):
            return
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


class ProgressLog(L.Callback):
    """One plain progress line every ``every_n_steps`` optimizer steps (and at least every
    ``min_interval_s`` seconds), readable in a terminal, a log file or CI output alike::

        step 25/50 (50%)  loss 7.8123  2.41 steps/s  elapsed 0:10  left 0:10

    ``scratchpath fit`` adds it when the recipe turns Lightning's progress bar off (the smoke
    recipes do). Rank zero only. The loss of a line's step is copied to the host without waiting
    (:class:`~scratchpath.distributed.HostCopy`) and the line is printed once the copy has
    landed, usually at the next step: printing never makes the host wait for the device (except
    for the last line, at the end of training). The rate is over the steps since training
    started (or resumed), so ``left`` settles after the first lines.

    Args:
        every_n_steps: print every this many steps (None: the trainer's ``log_every_n_steps``,
            coarsened so that a run of known length prints at most about 20 lines).
        min_interval_s: also print when this long has passed since the last line, so slow steps
            still show life; 0 disables it.
        stream: where to write (default: ``sys.stderr`` at the time of each line).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        min_interval_s: float = 30.0,
        stream: TextIO | None = None,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ScratchpathError(f"every_n_steps: must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.min_interval_s = min_interval_s
        self.stream = stream
        self._start: float | None = None
        self._start_step = 0
        self._last_line = 0.0
        # the line waiting for its loss: (step, total, elapsed, loss copy or None)
        self._pending: tuple[int, int | None, float, HostCopy | None] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last_line = time.perf_counter()
        self._start_step = trainer.global_step
        self._pending = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if not trainer.is_global_zero or self._start is None:
            return
        self._print_landed(wait=False)
        step, now = trainer.global_step, time.perf_counter()
        total = _total_steps(trainer)
        every = self.every_n_steps or _default_every(trainer, total)
        due = step % every == 0 or step == total
        late = self.min_interval_s > 0 and now - self._last_line >= self.min_interval_s
        if step == self._start_step or not (due or late):
            return
        self._last_line = now
        self._print_landed(wait=True)  # the device is a whole line behind: the older line first
        loss = _loss_tensor(outputs)
        copy = HostCopy(loss) if loss is not None else None
        self._pending = (step, total, now - self._start, copy)
        self._print_landed(wait=False)  # off CUDA the loss is on the host already

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_landed(wait=True)

    def _print_landed(self, wait: bool) -> None:
        """Print the pending line once its loss is on the host (``wait``: wait for it)."""
        if self._pending is None:
            return
        step, total, elapsed, copy = self._pending
        if copy is not None and not wait and not copy.ready():
            return
        self._pending = None
        loss = None if copy is None else float(copy.values().reshape(-1)[0])
        print(self.line(step, total, loss, elapsed), file=self._out(), flush=True)

    def line(self, step: int, total: int | None, loss: float | None, elapsed: float) -> str:
        """The progress line for ``step`` of ``total`` after ``elapsed`` seconds."""
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        parts.append(f"{rate:.2f} steps/s" if rate >= 1 else f"{1 / max(rate, 1e-9):.2f} s/step")
        parts.append(f"elapsed {_clock(elapsed)}")
        if total and rate > 0:
            parts.append(f"left {_clock((total - step) / rate)}")
        return "  ".join(parts)

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr


def _default_every(trainer: L.Trainer, total: int | None) -> int:
    """``log_every_n_steps``, coarsened to at most ~20 lines over a run of known length."""
    every = trainer.log_every_n_steps or 50
    return max(every, -(-total // 20)) if total else every


def _total_steps(trainer: L.Trainer) -> int | None:
    """Optimizer steps the run will take (max_steps, else max_epochs x batches), None if open."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        total = trainer.estimated_stepping_batches
    except (RuntimeError, ValueError, TypeError):
        return None
    return int(total) if total and total != float("inf") else None


def _loss_tensor(outputs: Any) -> torch.Tensor | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return loss.detach().float() if isinstance(loss, torch.Tensor) else None


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


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

    Every signal in ``signals`` (SIGTERM: spot / preemptible VMs, Kubernetes, ``scancel``;
    SIGUSR1: what ``#SBATCH --signal=SIGUSR1@90`` sends before the time limit or a preemption) is
    handled the same way: the handler only sets a flag; the checkpoint is written by the training
    loop at the end of a batch that completed an optimiser step, so it never lands in the middle
    of a step or of a gradient accumulation, and its data position always agrees with
    ``global_step``. Then ``trainer.should_stop`` ends the run and ``scratchpath fit`` exits with
    ``128 + signal``; ``recipes/slurm_train.sbatch`` requeues the job on that status and the
    requeued run resumes from ``last.ckpt``. Lightning's own SIGTERM handling (an exception
    before the next batch, a collective inside the handler) and SLURM auto-requeue (a checkpoint
    written inside the signal handler, mid-step) are replaced; ``scratchpath fit`` turns
    auto-requeue off under SLURM. A hand-built Trainer that keeps Lightning's auto-requeue keeps
    its requeue signal.

    On one process the flag is looked at after every optimiser step (a Python variable: no
    device work). On several, ranks must agree on the step: the flag is a
    :class:`~scratchpath.distributed.CrossRankCheck` (the mechanism of the non-finite-loss stop
    too): every ``check_every_n_steps`` steps each rank starts a non-blocking all-reduce (max) of
    its flag and, on CUDA, a non-blocking copy of the result to pinned host memory; the result is
    read at the next check, when it is long complete, so the check never makes the CPU wait for
    the GPU's queue. All ranks then save and stop at the same step, at most
    ``2 × check_every_n_steps`` steps after the signal. With SIGTERM handled here, Lightning's
    own per-step broadcast of its SIGTERM flag (a host-device synchronisation every step under
    DDP) has nothing left to carry and is skipped for the run.

    It also makes all checkpoint writes of the run atomic (:class:`AtomicCheckpointIO`), and
    writes ``last.ckpt`` when training ends at ``max_steps`` mid-epoch, which ``ModelCheckpoint``
    skips. Resume with ``scratchpath fit ... --ckpt_path last``.

    Args:
        dirpath: folder of ``last.ckpt``; default: the ``ModelCheckpoint``'s folder, else
            ``<default_root_dir>/checkpoints``.
        signals: signal names that request a checkpoint-and-stop.
        check_every_n_steps: optimiser steps between the cross-rank checks of the flag (several
            processes only; keep ``2 × N × step time`` well under the signal's lead time).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"),
        check_every_n_steps: int = 10,
    ) -> None:
        unknown = [name for name in signals if not hasattr(signal, name)]
        if unknown:
            raise ScratchpathError(f"signals: unknown signal name(s) {unknown}")
        if check_every_n_steps < 1:
            raise ScratchpathError(f"check_every_n_steps: must be >= 1, got {check_every_n_steps}")
        self.dirpath = dirpath
        self.signals = tuple(signals)
        self.check_every_n_steps = check_every_n_steps
        self.received: int | None = None  # signal number that stopped the run
        self.saved_path: str | None = None
        self._pending: int | None = None  # set by the handler, acted on at a step boundary
        self._saved_step = -1
        self._step_at_batch_start = -1
        self._launcher: Any = None
        self._previous_handlers: dict[int, Any] = {}
        self._flag = CrossRankCheck(check_every_n_steps, host_value=True)
        self._epoch_loop: Any = None  # whose SIGTERM broadcast is skipped during the run

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning installs its own handlers just before training starts; ours replace them.
        environment = trainer._accelerator_connector.cluster_environment
        slurm_requeue = (
            environment.requeue_signal
            if isinstance(environment, SLURMEnvironment) and environment.auto_requeue
            else None
        )
        self._launcher = getattr(trainer.strategy, "launcher", None)
        self._flag = CrossRankCheck(self.check_every_n_steps, host_value=True)  # this run's
        for name in self.signals:
            signum = getattr(signal, name)
            if signum == slurm_requeue:
                continue  # a hand-built Trainer with Lightning's auto-requeue keeps its own
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)
        if signal.SIGTERM in self._previous_handlers:
            self._take_over_sigterm(trainer)

    def _take_over_sigterm(self, trainer: L.Trainer) -> None:
        """Lightning's SIGTERM flag can no longer be set (its handler is replaced), so its
        per-step broadcast of that flag from rank 0 (``torch.tensor`` + broadcast + ``.item()``
        every step under DDP) is skipped; a SIGTERM that came before this handler is taken
        over, so that Lightning does not stop that rank alone."""
        connector = getattr(trainer, "_signal_connector", None)
        if getattr(connector, "received_sigterm", False):
            self._pending = self._pending or int(signal.SIGTERM)
            connector.received_sigterm = False
        loop = trainer.fit_loop.epoch_loop
        if callable(getattr(loop, "_broadcast_sigterm_tensor", None)):
            loop._broadcast_sigterm_tensor = _no_sigterm_broadcast  # this run's loop only
            self._epoch_loop = loop

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Only remember the signal (and pass it on to the ranks this process launched, as
        Lightning does); the training loop acts on it at the next optimiser-step boundary."""
        if self._pending is None:
            self._pending = signum
            if self._launcher is not None and hasattr(self._launcher, "kill"):
                self._launcher.kill(signum)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # inside a gradient accumulation: only an optimiser step is a safe point
        if not self._stop_requested(trainer, pl_module):
            return
        self.received = self._pending or int(signal.SIGTERM)  # or another rank got a signal
        self.save_last(trainer)
        rank_zero_info(
            f"{signal.Signals(self.received).name} received: saved step {trainer.global_step} to "
            f"{self.saved_path}; resume with --ckpt_path last"
        )
        trainer.should_stop = True

    def _stop_requested(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Whether every rank stops now (the same answer on all ranks; see the class docstring)."""
        result = self._flag.poll(trainer.global_step, lambda: [float(self._pending is not None)])
        if result is None or not result[0]:
            return False
        self._flag.pending()  # every rank stops here: complete the reduction started now
        return True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = _model_checkpoint(trainer)
        already = (
            checkpoint is not None
            and getattr(checkpoint, "_last_global_step_saved", None) == trainer.global_step
        )
        if self.received is None and not already and trainer.global_step > 0:
            self.save_last(trainer)
        self._flag.pending()  # every rank ends here: complete the reduction in flight
        self._restore_handlers()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        """Put back the handlers found at ``on_train_start`` (Lightning's). It must happen
        before the Trainer's own teardown, which then restores what was there before the fit:
        restoring later would leave Lightning's SIGTERM handler installed after ``fit`` returns,
        and that handler only logs, so the process could no longer be terminated."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
        if self._epoch_loop is not None:
            vars(self._epoch_loop).pop("_broadcast_sigterm_tensor", None)
            self._epoch_loop = None

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
        if checkpoint is not None:
            # Saved at this step: else ModelCheckpoint.on_train_end (Lightning 2.6) writes last.ckpt
            # again after the stop has closed the epoch, and the resumed run would start the next
            # epoch's data mid-way instead of continuing this one.
            checkpoint._last_global_step_saved = trainer.global_step
            checkpoint._last_checkpoint_saved = path
        return path


def _no_sigterm_broadcast() -> None:
    """Stands in for Lightning's per-step SIGTERM broadcast while PreemptionCheckpoint handles
    SIGTERM (see :meth:`PreemptionCheckpoint._take_over_sigterm`)."""


def _model_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    found = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    return found[0] if found else None
