"""Callbacks: online probe on a real labelled store, throughput, preemption checkpoints."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from scratchpath import distributed
from scratchpath.callbacks import (
    AtomicCheckpointIO,
    OnlineEvaluation,
    PreemptionCheckpoint,
    ProgressLog,
    Throughput,
)
from scratchpath.errors import ScratchpathError
from scratchpath.finetune import split_store
from scratchpath.store import PatchStore, import_tiles

N_VIEWS = 3


@pytest.fixture(scope="module")
def lc25000_store(tiles_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """40 tiles per class of LC25000 lung at 64 px, with their augmentation groups."""
    source = tiles_dir / "lc25000_lung_224"
    with open(source / "labels.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    subset = [
        row
        for label in ("lung_aca", "lung_n", "lung_scc")
        for row in [r for r in rows if r["label"] == label][:40]
    ]
    folder = tmp_path_factory.mktemp("lc25000")
    with open(folder / "labels.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(subset)
    out = folder / "store"
    import_tiles(
        source,
        out,
        labels_csv=folder / "labels.csv",
        group_column="lc25000clean_group_id",
        tile_size=64,
    )
    return str(out)


class _TinyBackbones(L.LightningModule):
    """Stands in for an objective: an online ``backbone`` and an optional ``teacher_backbone``."""

    def __init__(self, teacher: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        if teacher is not None:
            self.teacher_backbone = teacher


class _Collapsed(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(x), 8)


def test_online_evaluation_split_keeps_groups_apart(lc25000_store: str) -> None:
    callback = OnlineEvaluation(lc25000_store, test_fraction=0.3, max_tiles=None)
    callback.setup(L.Trainer(logger=False), _TinyBackbones(), "fit")
    groups = np.asarray(PatchStore(lc25000_store).tiles["group"], dtype=str)
    train_groups = set(groups[callback._sides["train"][1]])
    test_groups = set(groups[callback._sides["test"][1]])
    assert train_groups and test_groups and not train_groups & test_groups


def test_online_evaluation_splits_as_scratchpath_eval_does(lc25000_store: str) -> None:
    # one split function for online and offline figures: grouped and class-stratified
    callback = OnlineEvaluation(lc25000_store, test_fraction=0.4, max_tiles=None, seed=3)
    callback.setup(L.Trainer(logger=False), _TinyBackbones(), "fit")
    train, test = split_store(PatchStore(lc25000_store), test_fraction=0.4, seed=3)
    np.testing.assert_array_equal(callback._sides["train"][1], train)
    np.testing.assert_array_equal(callback._sides["test"][1], test)
    test_counts = np.bincount(np.asarray(PatchStore(lc25000_store).labels)[test], minlength=3)
    assert (test_counts >= 10).all()  # stratified: every class on the test side


def test_online_evaluation_reports_accuracy_and_rank_of_random_backbone(lc25000_store: str) -> None:
    callback = OnlineEvaluation(lc25000_store, linear_epochs=20, which="student")
    metrics = callback.evaluate(L.Trainer(logger=False), _TinyBackbones())
    assert set(metrics) == {"knn_acc", "knn_balanced_acc", "linear_acc", "rankme"}
    # LC25000's classes differ in colour: even a random conv net separates them well
    assert metrics["knn_acc"] > 0.5
    assert metrics["rankme"] > 2.0


def test_online_evaluation_probes_the_teacher(lc25000_store: str) -> None:
    model = _TinyBackbones(teacher=_Collapsed())
    metrics = OnlineEvaluation(lc25000_store, linear_epochs=5).evaluate(L.Trainer(), model)
    assert metrics["rankme"] < 1.01  # the constant teacher, not the random student


def test_online_evaluation_rejects_unlabelled_store(tiles_dir: Path, tmp_path: Path) -> None:
    source = tiles_dir / "deeptexture_examples_unlabeled_256" / "unlabeled"
    import_tiles(source, tmp_path / "store", tile_size=32)
    with pytest.raises(ScratchpathError, match=r"train_store: .* has no labels"):
        OnlineEvaluation(str(tmp_path / "store")).setup(L.Trainer(), _TinyBackbones(), "fit")


class _ViewBatches(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"views": [torch.randn(3, 8, 8, generator=g) for _ in range(N_VIEWS)], "index": i}


class _TinyObjective(L.LightningModule):
    """A linear model trained on its views; ``signal_at_step`` sends a signal to this process
    (on rank ``signal_rank`` only) in the first batch of that optimiser step."""

    def __init__(
        self, signal_at_step: int | None = None, signum: int = signal.SIGUSR1, signal_rank: int = 0
    ) -> None:
        super().__init__()
        self.backbone = nn.Linear(3 * 8 * 8, 4)
        self.signal_at_step, self.signum, self.signal_rank = signal_at_step, signum, signal_rank
        self._signalled = False

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        due = self.global_step == self.signal_at_step and self.global_rank == self.signal_rank
        if due and not self._signalled:
            self._signalled = True
            os.kill(os.getpid(), self.signum)
        loss = sum(self.backbone(v.flatten(1)).pow(2).mean() for v in batch["views"])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(root: Path, callbacks: list, max_steps: int = 6, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "logger": L.pytorch.loggers.CSVLogger(root, name="logs"),
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **kwargs,
    }
    return L.Trainer(
        default_root_dir=root, accelerator="cpu", max_steps=max_steps, callbacks=callbacks,
        **options,
    )  # fmt: skip


def _loader() -> DataLoader:
    return DataLoader(_ViewBatches(), batch_size=4)


def test_throughput_counts_every_view(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [Throughput(window=2)])
    trainer.fit(_TinyObjective(), _loader())
    with open(Path(trainer.log_dir) / "metrics.csv", newline="") as file:
        rows = [r for r in csv.DictReader(file) if r.get("perf/images_per_s")]
    assert rows, "no throughput logged"
    for row in rows:
        ratio = float(row["perf/images_per_s"]) / float(row["perf/samples_per_s"])
        assert ratio == pytest.approx(N_VIEWS)
        assert float(row["perf/peak_rss_gb"]) > 0.01


class _LateEvent:
    """The completion event of a loss copy that lands one step late."""

    def __init__(self) -> None:
        self.asked = 0

    def query(self) -> bool:
        self.asked += 1
        return self.asked > 1

    def synchronize(self) -> None:
        self.asked = 2


def test_progress_line_is_printed_once_its_loss_has_landed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss of a line's step is copied without waiting: its line comes out at the first
    step at which the copy has landed (here one step later), the last one at the end of the
    run (waiting for it), and each with the loss of its own step."""
    monkeypatch.setattr(distributed, "_completion_event", lambda device: _LateEvent())
    printed: list[tuple[int, str]] = []  # (global step when printed, line)
    trainer = _trainer(tmp_path, [], max_steps=6)

    class Lines(io.StringIO):
        def write(self, text: str) -> int:
            if text.strip():
                printed.append((trainer.global_step, text.strip()))
            return len(text)

    losses: dict[int, float] = {}

    class LossesAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, idx):
            losses[trainer.global_step] = float(outputs["loss"])

    trainer.callbacks[:0] = [ProgressLog(every_n_steps=2, stream=Lines()), LossesAt()]
    trainer.fit(_TinyObjective(), _loader())
    assert [(at, line.split("  ")[0]) for at, line in printed] == [
        (3, "step 2/6 (33%)"), (5, "step 4/6 (67%)"), (6, "step 6/6 (100%)"),
    ]  # fmt: skip
    for _, line in printed:
        step = int(line.split()[1].split("/")[0])
        assert line.split("  ")[1] == f"loss {losses[step]:.4f}"


def test_preemption_signal_saves_last_checkpoint_and_stops(tmp_path: Path) -> None:
    callback = PreemptionCheckpoint()
    trainer = _trainer(tmp_path, [callback], max_steps=50)
    trainer.fit(_TinyObjective(signal_at_step=3), _loader())
    assert callback.received == signal.SIGUSR1
    checkpoint = torch.load(callback.saved_path, weights_only=True)
    assert checkpoint["global_step"] == 4  # the batch in flight finishes, then the save
    assert trainer.global_step == 4


def test_sigterm_is_handled_like_sigusr1_at_a_batch_boundary(tmp_path: Path) -> None:
    callback = PreemptionCheckpoint()
    trainer = _trainer(tmp_path, [callback], max_steps=50)
    trainer.fit(_TinyObjective(signal_at_step=2, signum=signal.SIGTERM), _loader())  # no raise
    assert callback.received == signal.SIGTERM
    assert torch.load(callback.saved_path, weights_only=True)["global_step"] == 3
    assert trainer.global_step == 3 and not trainer.received_sigterm


def test_preemption_during_gradient_accumulation_saves_at_the_optimizer_step(
    tmp_path: Path,
) -> None:
    """The signal lands in the first of two micro-batches: the save waits for the second, so a
    resumed run never takes a step on half an accumulated batch."""
    callback = PreemptionCheckpoint()
    trainer = _trainer(tmp_path, [callback], max_steps=50, accumulate_grad_batches=2)
    trainer.fit(_TinyObjective(signal_at_step=3), _loader())
    checkpoint = torch.load(callback.saved_path, weights_only=True)
    assert checkpoint["global_step"] == 4  # not 3: micro-batch 7 (of step 4) completed first
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert progress["processed"] == 8  # a whole number of accumulations (resume starts at 8)


class _FailingObjective(_TinyObjective):
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.global_step == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("objective", [_TinyObjective, _FailingObjective])
def test_fit_leaves_the_signal_handlers_it_found(tmp_path: Path, objective: type) -> None:
    """After ``fit`` (finished or failed) SIGTERM and SIGUSR1 do what they did before: a
    leftover Lightning handler would only log them, and the process could not be terminated."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    trainer = _trainer(tmp_path, [PreemptionCheckpoint()], max_steps=4)
    with contextlib.suppress(RuntimeError):
        trainer.fit(objective(), _loader())
    assert {s: signal.getsignal(s) for s in before} == before


def test_preemption_flag_check_interval_is_validated() -> None:
    with pytest.raises(ScratchpathError, match="check_every_n_steps"):
        PreemptionCheckpoint(check_every_n_steps=0)


def test_ddp_ranks_stop_together_at_the_next_flag_check(tmp_path: Path) -> None:
    """Only rank 1 is signalled (at step 3). The flag is all-reduced without blocking every 2
    steps and read at the next check: both ranks save and stop at step 6."""
    callback = PreemptionCheckpoint(check_every_n_steps=2)
    trainer = _trainer(
        tmp_path, [callback], max_steps=50, strategy="ddp_spawn", devices=2, logger=False
    )
    trainer.fit(_TinyObjective(signal_at_step=3, signal_rank=1), _loader())
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6


def test_training_end_writes_last_checkpoint(tmp_path: Path) -> None:
    callback = PreemptionCheckpoint()
    trainer = _trainer(tmp_path, [callback], max_steps=5, enable_checkpointing=False)
    trainer.fit(_TinyObjective(), _loader())  # no ModelCheckpoint: nothing else saves
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5


def test_atomic_checkpoint_io_keeps_old_file_when_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)

    def torn_save(obj: object, file: object) -> None:
        file.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("killed mid-write")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="killed mid-write"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
