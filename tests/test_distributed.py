"""scratchpath.distributed: host<->device moves without waiting, and the cross-rank check that the
non-finite-loss stop and the preemption flag share, on 2 CPU processes (gloo).

One rank's copies land late (a fake completion event that answers "not yet" for a while, as
the CUDA event of a rank whose GPU is behind would): the ranks must still decide at the same
step, since a rank that stops a step before the others leaves them waiting in the next gradient
all-reduce until the collective times out.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from scratchpath import distributed
from scratchpath.callbacks import PreemptionCheckpoint
from scratchpath.distributed import CrossRankCheck, HostCopy, rank_and_world_size, to_device
from scratchpath.objectives import SimCLR
from sync_helpers import StepCounter

TIMEOUT = datetime.timedelta(seconds=60)  # a rank left waiting fails the test, not hangs it


class LaggingEvent:
    """A copy's completion event that lands late: ``query()`` answers False the first ``lag``
    times; ``synchronize()`` waits for it (here: it has landed from then on)."""

    def __init__(self, lag: int = 6) -> None:
        self.lag, self.landed = lag, False

    def query(self) -> bool:
        self.lag -= 1
        return self.landed or self.lag < 0

    def synchronize(self) -> None:
        self.landed = True


def _lagging_on_rank_one(device: torch.device) -> LaggingEvent | None:
    return LaggingEvent() if rank_and_world_size()[0] == 1 else None


def test_to_device_and_host_copy_keep_values_and_types():
    array = np.array([[True, False], [False, True]])
    tensor = to_device(array, torch.bool, torch.device("cpu"))
    assert tensor.dtype == torch.bool and np.array_equal(tensor.numpy(), array)
    copy = HostCopy(torch.tensor([1.5, -math.inf], dtype=torch.float64))
    assert copy.ready() and copy.values().tolist() == [1.5, -math.inf]


def test_one_process_decides_at_every_nth_step_from_the_previous_reduction():
    check = CrossRankCheck(every=3)
    seen = [check.poll(step, lambda s=step: torch.tensor([float(s)])) for step in range(1, 10)]
    assert [None if r is None else r.tolist() for r in seen] == [
        None, None, None, None, None, [3.0], None, None, [6.0],
    ]  # fmt: skip
    flag = CrossRankCheck(every=3, host_value=True)  # a host flag on one process: every step
    assert flag.poll(1, lambda: [1.0]).tolist() == [1.0]


def _check_worker(rank: int, init_file: str, out: str) -> None:
    distributed._completion_event = _lagging_on_rank_one  # this process only
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=TIMEOUT)  # fmt: skip
    try:
        check, decided = CrossRankCheck(every=2), None
        for step in range(1, 13):
            flag = float(rank == 1 and step >= 3)  # only rank 1 sees it, from step 3
            result = check.poll(step, lambda flag=flag: torch.tensor([flag]))
            if result is not None and result[0] > 0:
                decided = step
                break
        Path(out, f"rank{rank}.json").write_text(json.dumps(decided))
    finally:
        dist.destroy_process_group()


def test_ranks_decide_at_the_same_step_when_one_rank_lags(tmp_path: Path):
    mp.start_processes(_check_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")  # fmt: skip
    decided = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # started at step 4 (the first due step holding the flag), read at step 6 on both ranks
    assert decided == [6, 6]


class _NaNOnRankOne(SimCLR):
    """SimCLR whose loss is NaN on rank 1 at step 2 (rank 0 sees NaN only once the averaged
    gradients have spoilt its weights, from step 3)."""

    def compute_loss(self, views):
        loss = super().compute_loss(views)
        return loss * math.nan if self.global_step == 2 and self.global_rank == 1 else loss


def _fit_worker(rank: int, port: int, out: str) -> None:
    """One rank, launched as torchrun would (Lightning joins the process group it finds in the
    environment): trains until the non-finite stop and records where it stopped. The error is
    caught here, so that a rank that stops first cannot have the other one killed before it
    has recorded its own stop."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")  # fmt: skip
    distributed._completion_event = _lagging_on_rank_one
    torch.set_num_threads(1)
    steps = StepCounter()
    module = _NaNOnRankOne(
        backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 32, "patch_size": 8,
        "depth": 1}, proj_hidden_dim=32, proj_out_dim=16, warmup_epochs=0,
        nonfinite_check_every=2,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(rank)
    batches = [{"views": [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)],
                "index": torch.arange(4)} for _ in range(12)]  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=12, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=TIMEOUT),
        callbacks=[steps, PreemptionCheckpoint(dirpath=out)],
    )  # fmt: skip
    try:
        trainer.fit(module, DataLoader(batches, batch_size=None))
        error = None
    except Exception as raised:
        error = f"{type(raised).__name__}: {raised}"
    counts = {step: c.counts() for step, _, c in steps.steps}
    record = {"step": trainer.global_step, "error": error, "counts": counts}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_nonfinite_stop_is_decided_at_the_same_step_on_both_ranks(tmp_path: Path) -> None:
    """NaN on rank 1 at step 2, checked every 2 steps, rank 1's copies landing late: both ranks
    stop after step 6 (the reduction started after step 4 is read after step 6) naming step 2,
    and no step of either rank synchronises with the host (Lightning's per-step SIGTERM
    broadcast is skipped while PreemptionCheckpoint handles SIGTERM)."""
    mp.start_processes(_fit_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")  # fmt: skip
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in records] == [6, 6], records
    for record in records:
        assert record["error"].startswith("ScratchpathError: step 2: loss is nan"), record
        steady = [record["counts"][str(step)] for step in range(2, 5)]
        assert steady == [{}] * 3, record["counts"]
    assert not list(tmp_path.glob("*.ckpt"))  # the NaN weights were never saved
