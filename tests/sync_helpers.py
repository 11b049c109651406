"""The sync / host-data counter of ``tests/test_sync.py`` (what it counts and why: that
module's docstring), shared with the DDP tests. Not a test module (no ``test_`` prefix)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from traceback import extract_stack

import lightning as L
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from scratchpath.distributed import is_logging_step

aten = torch.ops.aten
SYNCING_OPS = {
    aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t)
    aten.is_nonzero.default,
    aten.equal.default,
    aten.allclose.default,
    aten.nonzero.default,
    aten.argwhere.default,
    aten.masked_select.default,
    aten.masked_scatter.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
    aten.bincount.default,
}
BOOLEAN_INDEXING_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
HOST_DATA_OPS = {aten.lift_fresh.default, aten.lift_fresh_copy.default}  # torch.tensor(data)
COPY_OPS = {aten._to_copy.default, aten.copy_.default}
# torch factories that make a host tensor when called without a device
HOST_FACTORIES = {
    torch.arange, torch.empty, torch.eye, torch.full, torch.linspace, torch.logspace,
    torch.ones, torch.rand, torch.randint, torch.randn, torch.randperm, torch.zeros,
}  # fmt: skip


class _FactoryCalls(TorchFunctionMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_FACTORIES and kwargs.get("device") is None and "pin_memory" not in kwargs:
            self.counter.record("host_data", f"torch.{func.__name__}")
        return func(*args, **kwargs)


class SyncCounter(TorchDispatchMode):
    """Counts, by op name, the ops that synchronise a GPU with its host (``syncs``), that make
    a tensor from host data (``host_data``) and that copy from pageable host memory to a device
    (``pageable_copies``); ``origins`` keeps the Python call stack of each (see the module doc).

    ``host_tensors`` returns tensors that stay in host memory on a GPU too (AdamW's per-parameter
    ``step`` counters, kept on the CPU unless ``capturable``): reading them is no device sync.
    Use as a context manager, or ``start()`` / ``stop()``.
    """

    def __init__(self, host_tensors=lambda: ()) -> None:
        super().__init__()
        self.syncs: Counter[str] = Counter()
        self.host_data: Counter[str] = Counter()
        self.pageable_copies: Counter[str] = Counter()
        self.origins: list[str] = []
        self.host_tensors = host_tensors
        self.active = False
        self._factories = _FactoryCalls(self)

    def record(self, kind: str, name: str) -> None:
        getattr(self, kind)[name] += 1
        frames = [f"{Path(f.filename).name}:{f.name}" for f in extract_stack()[:-2]]
        self.origins.append(" < ".join(reversed(frames[-12:])))

    def counts(self) -> dict[str, int]:
        return {**self.syncs, **self.host_data, **self.pageable_copies}

    def __enter__(self):
        self._factories.__enter__()
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._factories.__exit__(*exc)
        self.active = False

    def start(self) -> None:
        self.__enter__()

    def stop(self) -> None:
        self.__exit__(None, None, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING_OPS:
            if not any(args[0] is t for t in self.host_tensors()):
                self.record("syncs", str(func))
        elif func in BOOLEAN_INDEXING_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self.record("syncs", f"{func} with a boolean mask")
        elif func in HOST_DATA_OPS:
            self.record("host_data", str(func))
        elif func in COPY_OPS:
            source = args[0] if func is aten._to_copy.default else args[1]
            target = kwargs.get("device") if func is aten._to_copy.default else args[0].device
            to_other = target is not None and torch.device(target).type != "cpu"
            if source.device.type == "cpu" and to_other and not source.is_pinned():
                self.record("pageable_copies", str(func))
        return func(*args, **kwargs)


class StepCounter(L.Callback):
    """Counts from the start of one training batch to the start of the next: the hooks of every
    callback, forward, loss, backward, clipping, optimiser step, EMA update, Lightning's logging
    and progress bookkeeping, the non-finite check, then the next batch's transfer and device
    work (µm crops, device views). Put it first among the callbacks."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, bool, SyncCounter]] = []  # (step, logging step, counts)

    def _stop(self) -> None:
        if self.steps and self.steps[-1][2].active:
            self.steps[-1][2].stop()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._stop()

        def optimizer_steps():
            return [state["step"] for optimizer in trainer.optimizers
                    for state in optimizer.state.values() if "step" in state]  # fmt: skip

        counter = SyncCounter(optimizer_steps)
        self.steps.append((trainer.global_step, is_logging_step(trainer), counter))
        counter.start()

    def on_train_end(self, trainer, pl_module):
        self._stop()

    def on_exception(self, trainer, pl_module, exception):
        self._stop()
