"""A run reads one committed state of each store: pickled workers (spawn, forkserver) and DDP
ranks (2 gloo processes) keep reading it while an ingest appends; ranks agree or fail at once.

Stores A (2 slides of 8 real H&E tiles) and B (1 slide of 8): tile 16 of ``PatchStore(A, B)``
is B's first tile until a slide is appended to A, after which a fresh open puts A's new tiles
there. Everything that belongs to a run must keep seeing B's tile.
"""

from __future__ import annotations

import multiprocessing
import pickle
import socket
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from scratchpath.data import PatchDataModule, ViewBatches
from scratchpath.data.agreement import agree_on_stores
from scratchpath.data.sampling import BatchRequest
from scratchpath.errors import ScratchpathError
from scratchpath.store import PatchStore, StoreWriter
from scratchpath.views import TwoViews

TILE = 224


@pytest.fixture(scope="module")
def lung_tiles(tiles_dir: Path) -> np.ndarray:
    files = sorted((tiles_dir / "lc25000_lung_224").glob("*/*.jpeg"))[::7][:64]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def append_slide(path: Path, tiles: np.ndarray, name: str) -> None:
    """Commit one slide of ``tiles`` (what an ingest does per slide)."""
    with StoreWriter(path, tile_size=TILE, codec="zstd", shard_size=8) as writer:
        record = {"source": name, "slide_id": name, "sha256": name, "mpp": 0.5}
        with writer.begin_slide(record) as slide:
            slide.add(tiles, x=np.arange(len(tiles)) * TILE, mpp=0.5)


@pytest.fixture
def stores(tmp_path: Path, lung_tiles: np.ndarray) -> tuple[Path, Path]:
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    append_slide(a, lung_tiles[0:8], "a0")
    append_slide(a, lung_tiles[8:16], "a1")
    append_slide(b, lung_tiles[16:24], "b0")
    return a, b


def test_a_store_keeps_its_committed_state_when_pickled_after_an_append(
    stores: tuple[Path, Path], lung_tiles: np.ndarray
) -> None:
    a, b = stores
    run = PatchStore(a, b)
    assert len(run) == 24
    append_slide(a, lung_tiles[24:32], "a2")
    again = pickle.loads(pickle.dumps(run))  # what a spawned worker or another rank receives
    assert len(again) == 24 and again.fingerprint == run.fingerprint
    np.testing.assert_array_equal(again.read([16, 23]), lung_tiles[[16, 23]])  # still B
    fresh = PatchStore(a, b)  # a new run sees the append
    assert len(fresh) == 32 and fresh.fingerprint != run.fingerprint
    np.testing.assert_array_equal(fresh.read([16]), lung_tiles[[24]])
    np.testing.assert_array_equal(PatchStore(a, b, state=run.state).read([16]), lung_tiles[[16]])


def test_a_rewritten_store_is_refused_at_the_pinned_state(
    stores: tuple[Path, Path], lung_tiles: np.ndarray, tmp_path: Path
) -> None:
    a, b = stores
    run = PatchStore(a, b)
    replacement = tmp_path / "r.zarr"  # same slide count, other tiles
    append_slide(replacement, lung_tiles[40:48], "r0")
    append_slide(replacement, lung_tiles[48:56], "r1")
    a.rename(tmp_path / "old.zarr")
    replacement.rename(a)
    with pytest.raises(ScratchpathError, match=r"a\.zarr: its first 2 committed slides are not"):
        pickle.loads(pickle.dumps(run))
    with pytest.raises(ScratchpathError, match="fewer than the 3"):
        PatchStore(a, b, state=[(3, run.state[0][1]), run.state[1]])


@pytest.mark.slow
@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_spawned_workers_read_the_runs_state_while_an_ingest_appends(
    stores: tuple[Path, Path], lung_tiles: np.ndarray, context: str
) -> None:
    a, b = stores
    views = TwoViews(output_size=32, device_augment=True)  # lossless store: workers send tiles
    dataset = ViewBatches(PatchStore(a, b), views, seed=0)
    append_slide(a, lung_tiles[24:32], "a2")  # committed after the run opened its stores
    request = BatchRequest(0, np.array([16, 23, 3]))
    loader = DataLoader(dataset, sampler=[request], batch_size=None, num_workers=1,
                        multiprocessing_context=context)  # fmt: skip
    (batch,) = list(loader)
    np.testing.assert_array_equal(batch["tiles"].numpy(), lung_tiles[[16, 23, 3]])


# -- DDP: 2 gloo ranks ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_opens(rank: int, port: int, paths: list[str], other: str, out: str) -> None:
    """One rank: open the stores (rank 1 only after rank 0 did and a slide was committed, or
    other stores altogether), agree, and record what it reads or the error it raised."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        if rank == 0:
            store = PatchStore(*paths)
        torch.distributed.barrier()
        if rank == 1:
            if other:
                store = PatchStore(other, paths[1])
            else:
                append_slide(Path(paths[0]), np.full((8, TILE, TILE, 3), 7, np.uint8), "late")
                store = PatchStore(*paths)
        seen_before = len(store)
        try:
            store = agree_on_stores(store)
            result = {"before": seen_before, "after": len(store), "tile16": store.read([16])}
        except ScratchpathError as err:
            result = {"error": str(err)}
        Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def _two_ranks(paths: list[str], other: str, out: Path) -> list[dict]:
    port = _free_port()
    context = multiprocessing.get_context("fork")  # as Lightning's ddp_fork starts CPU ranks
    procs = [context.Process(target=_rank_opens, args=(r, port, paths, other, str(out)))
             for r in (0, 1)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, "a rank hung or died"
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in (0, 1)]


def test_ranks_opening_across_a_commit_agree_on_rank_0s_state(
    stores: tuple[Path, Path], lung_tiles: np.ndarray, tmp_path: Path
) -> None:
    a, b = stores
    ranks = _two_ranks([str(a), str(b)], "", tmp_path)
    assert ranks[0]["before"] == 24 and ranks[1]["before"] == 32  # rank 1 opened after a commit
    assert ranks[0]["after"] == ranks[1]["after"] == 24
    for r in ranks:
        np.testing.assert_array_equal(r["tile16"][0], lung_tiles[16])  # B's first tile


def test_ranks_that_see_different_stores_all_fail_with_one_line(
    stores: tuple[Path, Path], lung_tiles: np.ndarray, tmp_path: Path
) -> None:
    a, b = stores
    other = tmp_path / "other.zarr"  # what another node might hold under the same name
    append_slide(other, lung_tiles[32:40], "o0")
    append_slide(other, lung_tiles[40:48], "o1")
    ranks = _two_ranks([str(a), str(b)], str(other), tmp_path)
    for r in ranks:  # every rank raises (none waits in a collective); one line names both
        assert "\n" not in r["error"]
        assert r["error"].startswith("stores: rank 1 cannot open the committed state rank 0")


# -- a whole run: 2 gloo ranks under Lightning, an ingest appending throughout -----------------
def _ingest(path: str, tiles: np.ndarray, stop, started) -> None:
    for k in range(200):
        append_slide(Path(path), tiles, f"ingest{k}")
        started.set()
        if stop.is_set():
            return
        time.sleep(0.05)


class _Recorder(L.LightningModule):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.out = out
        self.seen: list[list[int]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["index"].tolist())
        return self.layer(batch["views"][0].mean(dim=(2, 3))).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_train_end(self) -> None:
        state = self.trainer.datamodule.store.state
        np.save(self.out / f"rank{self.global_rank}.npy", np.array(self.seen))
        (self.out / f"state{self.global_rank}.pkl").write_bytes(pickle.dumps(state))


class _StaggeredModule(PatchDataModule):
    """Rank 1 opens the stores only once the ingest has committed past what rank 0 saw."""

    def setup(self, stage: str) -> None:
        if self.trainer.global_rank == 0:
            self.store  # noqa: B018 (opens it)
        torch.distributed.barrier()
        if self.trainer.global_rank == 1:
            seen = len(PatchStore(*self.stores))
            while len(PatchStore(*self.stores)) == seen:
                time.sleep(0.02)
        super().setup(stage)


@pytest.mark.slow
def test_a_two_rank_run_reads_one_state_while_an_ingest_appends(
    stores: tuple[Path, Path], lung_tiles: np.ndarray, tmp_path: Path
) -> None:
    a, b = stores
    context = multiprocessing.get_context("spawn")
    stop, started = context.Event(), context.Event()
    ingest = context.Process(target=_ingest, args=(str(a), lung_tiles[56:64], stop, started))
    ingest.start()
    try:
        assert started.wait(60)
        trainer = L.Trainer(
            max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        dm = _StaggeredModule(stores=[str(a), str(b)], views=TwoViews(output_size=32),
                              batch_size=4, num_workers=1, pin_memory=False)  # fmt: skip
        trainer.fit(_Recorder(tmp_path), datamodule=dm)
    finally:
        stop.set()
        ingest.join(timeout=60)
    states = [pickle.loads((tmp_path / f"state{r}.pkl").read_bytes()) for r in (0, 1)]
    assert states[0] == states[1]  # one committed state for both ranks
    pinned = PatchStore(a, b, state=states[0])
    assert len(PatchStore(a, b)) > len(pinned)  # the ingest went on committing meanwhile
    ranks = [np.load(tmp_path / f"rank{r}.npy") for r in (0, 1)]
    assert ranks[0].shape == ranks[1].shape  # equal batch counts: nobody waits
    assert max(int(r.max()) for r in ranks) < len(pinned)
