"""Training speed, memory and a plain progress line: what an operator watches in a job's log."""

from __future__ import annotations

import resource
import sys
import time
from collections import deque
from typing import Any, TextIO

import lightning as L
import torch

from scratchpath.distributed import HostCopy, is_logging_step
from scratchpath.errors import ScratchpathError


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
