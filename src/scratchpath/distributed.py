"""Ranks, and moving values between host and device without waiting (importable by every layer).

What the data module, the objectives and the callbacks share, each written once:

- :func:`rank_and_world_size`: this process's rank and the number of processes.
- :func:`to_device`: host data (a NumPy array) on the device through pinned memory, copied
  without blocking: never a pageable host-to-device copy inside a training step.
- :class:`HostCopy`: a small device tensor copied to host memory without making the host wait
  (pinned memory, a non-blocking copy and a CUDA event); read it once it has landed.
- :class:`CrossRankCheck`: a per-rank value (a stop flag, the first non-finite step) reduced
  over all ranks (element-wise maximum) without making the host wait, and decided at fixed
  steps. The non-finite-loss stop (:class:`~scratchpath.objectives.SSLObjective`) and the
  preemption checkpoint (:class:`~scratchpath.callbacks.PreemptionCheckpoint`) both use it, so
  both stop every rank at the same step by the same rules.

Only this module and ``objectives/collectives.py`` talk to ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def to_device(array: Any, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``array`` (NumPy, or Python numbers) as a ``dtype`` tensor on ``device``, without a
    pageable copy: written into pinned memory (PyTorch's caching host allocator keeps that
    block until the copy has run) and copied non-blocking. No tensor is made from Python data
    (``torch.tensor`` / ``from_numpy``), so ``tests/test_sync.py`` can count those as uploads."""
    device = torch.device(device)
    array = np.asarray(array)
    host = torch.empty(array.shape, dtype=dtype, pin_memory=device.type == "cuda")
    host.numpy()[...] = array
    return host.to(device, non_blocking=True)


def _completion_event(device: torch.device) -> Any:
    """A CUDA event recorded now on the current stream (None off CUDA: host memory is read
    directly). One function, so that a test can make one rank's copies land late."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


class HostCopy:
    """``tensor`` copied to host memory without making the host wait for the device.

    On CUDA the copy goes to pinned memory (PyTorch's caching host allocator keeps the block
    until the copy has run), queued behind the work that produces ``tensor``, and a CUDA event
    marks its completion: :meth:`ready` asks the event (no wait), :meth:`values` waits for it.
    Off CUDA, ``tensor`` is already in host memory and is read directly, so it must not be
    changed in place afterwards. Reading never goes through the dispatcher (``numpy()``), so a
    read is no device synchronisation on any device.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        device, tensor = tensor.device, tensor.detach()
        if device.type == "cuda":
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            tensor = host
        self._host = tensor
        self._event = _completion_event(device)

    def ready(self) -> bool:
        """Whether the copy has landed (never waits)."""
        return self._event is None or bool(self._event.query())

    def values(self) -> np.ndarray:
        """The copied values (waits for the copy if it has not landed yet)."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host.numpy()


class _Reduction:
    """One started element-wise maximum over ranks, on its way to host memory."""

    def __init__(self, value: torch.Tensor, world_size: int) -> None:
        self._work = None
        value = value.clone()  # reduced in place; the caller's tensor stays as it is
        if world_size > 1:
            if dist.get_backend() != "nccl" and value.device.type != "cpu":
                value = value.cpu()  # gloo reduces host tensors (CPU runs, tests)
            self._work = dist.all_reduce(value, op=dist.ReduceOp.MAX, async_op=True)
            if value.device.type == "cuda":
                # NCCL: orders the current stream after the reduction (the host does not wait),
                # so the copy below reads the reduced values
                self._work.wait()
                self._work = None
        self._copy = HostCopy(value)

    def result(self) -> np.ndarray:
        if self._work is not None:
            self._work.wait()  # gloo: a host reduction started `every` steps ago
            self._work = None
        return self._copy.values().copy()


class CrossRankCheck:
    """A small per-rank value, reduced over all ranks (element-wise maximum) without making the
    host wait for the device, and decided at fixed steps, so that every rank reads the same
    result at the same step.

    The rules: every rank calls :meth:`poll` after each optimiser step. At every ``every``-th
    step (``step % every == 0``, the same steps on every rank) it returns the result of the
    reduction it started at the previous such step (None at the first), then starts the next
    one: a non-blocking all-reduce, then a non-blocking copy of its result to host memory. That
    result was started ``every`` steps earlier, so reading it does not make the host wait
    unless the device is that many steps behind. A value seen at step ``s`` is therefore decided
    on all ranks at the same step, at most ``2 × every`` steps later; no rank can stop a step
    before another (which would leave the other waiting in the next gradient all-reduce until
    the collective timeout), and no rank skips a collective that the others issue.

    With ``host_value=True`` the value is a few Python numbers (a flag set by a signal
    handler): on one process there is nothing to reduce, and it is returned at every step.

    Args:
        every: steps between decisions.
        host_value: the value is Python numbers rather than a device tensor.
    """

    def __init__(self, every: int, host_value: bool = False) -> None:
        if every < 1:
            raise ValueError(f"every: must be at least 1, got {every}")
        self.every = every
        self.host_value = host_value
        self._in_flight: _Reduction | None = None

    def poll(
        self, step: int, value: Callable[[], torch.Tensor | Sequence[float]]
    ) -> np.ndarray | None:
        """After the optimiser step that made ``step``: the decided result, or None when this
        step decides nothing. ``value()`` (this rank's current value, a 1-D tensor or Python
        numbers) is only asked for at the steps that start a reduction."""
        world_size = rank_and_world_size()[1]
        if self.host_value and world_size == 1:
            return np.asarray(value(), dtype=np.float64)
        if step % self.every:
            return None
        result = self.pending()
        self._in_flight = _Reduction(self._as_tensor(value()), world_size)
        return result

    def pending(self) -> np.ndarray | None:
        """The result of the reduction in flight (waiting for it), or None if there is none.
        Starts no collective: safe on one rank alone (e.g. while handling an exception)."""
        if self._in_flight is None:
            return None
        result, self._in_flight = self._in_flight.result(), None
        return result

    def now(self, value: torch.Tensor | Sequence[float]) -> np.ndarray:
        """Reduce ``value`` over all ranks and wait for the result: a collective that every
        rank must call at the same point (the end of a run, a checkpoint), and one device
        synchronisation. The reduction in flight, if any, stays in flight."""
        return _Reduction(self._as_tensor(value), rank_and_world_size()[1]).result()

    @staticmethod
    def _as_tensor(value: torch.Tensor | Sequence[float]) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.detach().to(torch.float64).flatten()
        nccl = dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return to_device(value, torch.float64, device)


def is_logging_step(trainer: Any) -> bool:
    """Whether Lightning writes the logs at the end of this batch (every ``log_every_n_steps``
    steps, and when the run stops). Logged device tensors are read then, so a value that costs
    a host-to-device copy or a device read (a Python number, a throughput figure) is logged on
    these steps only. True without a trainer's logger connector (a hand-driven module)."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))
