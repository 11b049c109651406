"""Checkpoints that survive the file system and the scheduler: atomic writes, preemption saves."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from scratchpath.distributed import CrossRankCheck
from scratchpath.errors import ScratchpathError


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
