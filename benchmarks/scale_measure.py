"""The measurements of ``bench_scale.py``, each run in a fresh child process whose PYTHONPATH is
the code under test (this tree's ``src`` or a baseline's), so memory figures start clean.

Memory: ``private`` is the growth of the process's anonymous memory (what every rank and worker
holds on its own); ``peak`` the largest numpy/Python allocation total during the step
(tracemalloc, a separate pass so it does not slow the timed one); memory-mapped table and index
pages are file-backed and shared by all processes of a machine, so they count in neither.
Times are CPU seconds of the (single-threaded) child: on a shared machine they, not wall
seconds, say what one core costs; wall seconds are given beside.
"""

from __future__ import annotations

import gc
import itertools
import os
import pickle
import time
import tracemalloc
from pathlib import Path

import numpy as np

# Sampler options and their combinations. "weights_025" is what the µm-field recipes use.
SAMPLER_MODES = {
    "weights_025": {"mpp_weights": {0.25: 1.0}},
    "weights_all": {"mpp_weights": {0.25: 1.0, 0.5: 1.0, 1.0: 1.0, 2.0: 1.0}},
    "cap": {"max_tiles_per_slide": 500},
    "tissue": {"min_tissue": 0.5},
    "all": {"mpp_weights": {0.25: 1.0, 0.5: 1.0, 1.0: 1.0, 2.0: 1.0},
            "max_tiles_per_slide": 500, "min_tissue": 0.5},
}  # fmt: skip
RANK = {"batch_size": 256, "world_size": 8, "rank": 3, "seed": 0}


def _memory() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        out[key] = int(value.split()[0]) * 1024
    return out


class _Clock:
    def __init__(self) -> None:
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def lap(self) -> tuple[float, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        out = (cpu - self.cpu, wall - self.wall)
        self.cpu, self.wall = cpu, wall
        return out


def child_table(path: str, n: int, shuffle: str) -> dict:
    """The default path: open, reopen as a worker does (pickled), plan, memory."""
    from scratchpath.data.sampling import DistributedBatchSampler
    from scratchpath.store import PatchStore

    before = _memory()  # after the imports (torch alone is a few hundred MB)
    clock = _Clock()
    store = PatchStore(path)
    opened = clock.lap()
    pickle.loads(pickle.dumps(store))
    reopened = clock.lap()
    sampler = DistributedBatchSampler.from_store(store, shuffle=shuffle, **RANK)
    setup = clock.lap()
    sampler.set_epoch(1)
    first = next(iter(sampler))
    plan = clock.lap()
    it = iter(sampler)
    for _ in range(50):
        next(it)
    per_batch = clock.lap()[0] / 50
    assert len(first.indices) == 256
    after = _memory()
    return {"open_s": opened[1], "reopen_s": reopened[1], "setup_cpu_s": setup[0],
            "plan_s": plan[0], "batch_ms": per_batch * 1e3,
            "private_b": (after["Anonymous"] - before["Anonymous"]) / n,
            "rss_b": (after["Rss"] - before["Rss"]) / n}  # fmt: skip


def child_sampler(path: str, n: int, mode: str, shuffle: str) -> dict:
    """One sampler option (or combination): set-up, the epoch plan, per batch, memory."""
    from scratchpath.data.sampling import DistributedBatchSampler
    from scratchpath.store import PatchStore

    store = PatchStore(path)
    kwargs = {**RANK, **SAMPLER_MODES[mode], "shuffle": shuffle}
    gc.collect()
    before = _memory()["Anonymous"]
    clock = _Clock()
    sampler = DistributedBatchSampler.from_store(store, **kwargs)
    setup = clock.lap()
    sampler.set_epoch(1)
    next(iter(sampler))
    plan = clock.lap()
    it = iter(sampler)
    batches = max(1, min(50, len(sampler)))  # a tight cap on few slides leaves few batches
    for _ in range(batches):
        next(it, None)
    per_batch = clock.lap()[0] / batches
    private = (_memory()["Anonymous"] - before) / n
    del sampler, it
    gc.collect()
    tracemalloc.start()
    again = DistributedBatchSampler.from_store(store, **kwargs)
    again.set_epoch(2)
    next(iter(again))
    peak = tracemalloc.get_traced_memory()[1] / n
    tracemalloc.stop()
    return {"setup_cpu_s": setup[0], "setup_wall_s": setup[1], "plan_cpu_s": plan[0],
            "plan_wall_s": plan[1], "batch_ms": per_batch * 1e3, "private_b": private,
            "peak_b": peak, "tiles_per_epoch": again.tiles_per_epoch}  # fmt: skip


def child_index(path: str, n: int, cache_dir: str, traced: bool) -> dict:
    """The µm-field index of a store, built from scratch (fresh cache): time or peak memory."""
    os.environ["SCRATCHPATH_CACHE"] = cache_dir
    from scratchpath.data.fields import MagnificationIndex
    from scratchpath.store import PatchStore

    store = PatchStore(path)
    gc.collect()
    before = _memory()
    if traced:
        tracemalloc.start()
    clock = _Clock()
    index = MagnificationIndex(store)
    build = clock.lap()
    out = {"build_cpu_s": build[0], "build_wall_s": build[1],
           "private_b": (_memory()["Anonymous"] - before["Anonymous"]) / n,
           "mpps": [float(m) for m in index.mpps]}  # fmt: skip
    if traced:
        out["peak_b"] = tracemalloc.get_traced_memory()[1] / n
        tracemalloc.stop()
    return out


def child_index_worker(path: str, n: int, cache_dir: str) -> dict:
    """A DataLoader worker of a µm-field run: receives the dataset pickled (store pinned to the
    run's state, index by cache folder), plans 20 batches of 64 anchors; its private memory."""
    os.environ["SCRATCHPATH_CACHE"] = cache_dir
    from scratchpath.data.fields import FieldsOfView, FieldViewBatches
    from scratchpath.data.sampling import DistributedBatchSampler
    from scratchpath.store import PatchStore

    store = PatchStore(path)
    fields = FieldsOfView(n_global=2, n_local=8, global_size=224, local_size=96)
    blob = pickle.dumps(FieldViewBatches(store, fields, seed=0))  # the training process
    sampler = DistributedBatchSampler.from_store(store, batch_size=64, mpp_weights={0.25: 1.0})
    requests = list(itertools.islice(iter(sampler), 20))
    gc.collect()
    before = _memory()
    clock = _Clock()
    worker = pickle.loads(blob)
    opened = clock.lap()
    for request in requests:
        plan = worker.plan(request)
    per_batch = clock.lap()[0] / len(requests)
    after = _memory()
    assert (plan.source >= 0).all()
    return {"open_s": opened[1], "plan_ms": per_batch * 1e3,
            "private_b": (after["Anonymous"] - before["Anonymous"]) / n,
            "rss_b": (after["Rss"] - before["Rss"]) / n}  # fmt: skip


def child_opens(path: str, n: int, shuffle: str, buffer: int, workers: int, batches: int) -> dict:
    """File opens per tile of a rank's DataLoader (``workers`` processes reading the encoded
    bytes of ``batches`` batches of 256), and the batches' slide and shard diversity."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from scratchpath.data.sampling import DistributedBatchSampler
    from scratchpath.store import PatchStore

    store = PatchStore(path)
    sampler = DistributedBatchSampler.from_store(store, shuffle=shuffle, shuffle_buffer=buffer,
                                                 **RANK)  # fmt: skip
    sampler.set_epoch(1)
    requests = list(itertools.islice(iter(sampler), batches))
    slide = store.tiles["slide_index"]
    starts = store.shard_starts()
    slides = [len(np.unique(slide[r.indices])) for r in requests]
    shards = [len(np.unique(np.searchsorted(starts, r.indices, side="right"))) for r in requests]

    class Reads(Dataset):
        def __getitem__(self, request):
            blobs = store.read_encoded_batch(request.indices)
            return torch.utils.data.get_worker_info().id, len(blobs), _OPENS[0]

    loader = DataLoader(Reads(), sampler=requests, batch_size=None, num_workers=workers,
                        worker_init_fn=_count_opens, multiprocessing_context="fork")  # fmt: skip
    opens: dict[int, int] = {}
    tiles = 0
    clock = _Clock()
    for worker, count, opened in loader:
        opens[worker] = max(opens.get(worker, 0), opened)
        tiles += count
    wall = clock.lap()[1]
    return {"opens_per_tile": sum(opens.values()) / tiles, "tiles": tiles, "wall_s": wall,
            "slides_per_batch": float(np.mean(slides)),
            "shards_per_batch": float(np.mean(shards)), "shard_files": len(starts)}  # fmt: skip


_OPENS = [0]


def _count_opens(worker_id: int) -> None:
    """worker_init_fn: count the shard files this worker opens."""
    real = os.open

    def counting(path, *args, **kwargs):
        if "/tiles/c/" in os.fspath(path):
            _OPENS[0] += 1
        return real(path, *args, **kwargs)

    os.open = counting


def child_verify(path: str, n: int) -> dict:
    """``scratchpath verify --skip-decode`` on one core: shard reads, CRC-32C, table hashes."""
    from scratchpath.store.verify import verify_stores

    clock = _Clock()
    (report,) = verify_stores([path], workers=1, decode=False)
    cpu, wall = clock.lap()
    return {"cpu_us_per_tile": cpu / n * 1e6, "wall_s": wall, "damaged": len(report.damaged),
            "checksummed": report.checksummed}  # fmt: skip


def child_many(root: str, n: int) -> dict:
    """Open 10^3 shard stores as one: first (builds the merged table cache) and again."""
    from scratchpath.data.sampling import DistributedBatchSampler
    from scratchpath.store import PatchStore

    paths = sorted(str(p) for p in Path(root).glob("shard-*.zarr"))
    before = _memory()
    t = time.perf_counter()
    store = PatchStore(*paths)
    first = time.perf_counter() - t
    t = time.perf_counter()
    store = PatchStore(*paths)
    again = time.perf_counter() - t
    sampler = DistributedBatchSampler.from_store(store, batch_size=256, world_size=8)
    next(iter(sampler))
    private = _memory()["Anonymous"] - before["Anonymous"]
    assert len(store) == n
    return {"first_s": first, "again_s": again, "private_b": private / n, "stores": len(paths)}


def child_ingest(path: str, old: bool, n_slides: int) -> dict:
    """Seconds of per-slide bookkeeping for slides 1-10 (empty store) and n_slides + 1 .. + 10
    of a prefilled store; the old code's run record is its run.json, rewritten per slide."""
    import json

    from scratchpath.files import atomic_write
    from scratchpath.store import StoreWriter, TileCodec

    blob = TileCodec.parse("jpeg", 8).encode(np.zeros((8, 8, 3), np.uint8))

    def run(store: Path, first_slide: int) -> tuple[list[float], float]:
        times = []
        outcomes = [{"source": f"s{k}", "slide_id": f"s{k}", "n_tiles": 4, "status": "ok",
                     "reason": ""} for k in range(first_slide)]  # fmt: skip
        t_open = time.perf_counter()
        with StoreWriter(store, tile_size=224, codec="jpeg:90" if old else "jpeg") as writer:
            opened = time.perf_counter() - t_open
            log = None if old else open(store / "run.log.jsonl", "a")  # noqa: SIM115
            for k in range(first_slide, first_slide + 10):
                t = time.perf_counter()
                record = {"source": f"n{k}", "slide_id": f"n{k}", "sha256": f"n{k}"}
                with writer.begin_slide(record) as slide:
                    slide.add_encoded([blob] * 4, x=np.arange(4))
                outcome = {"source": f"n{k}", "slide_id": f"n{k}", "n_tiles": 4, "status": "ok",
                           "reason": ""}  # fmt: skip
                outcomes.append(outcome)
                if old:  # the old ingest loop: re-sum and rewrite run.json with every outcome
                    sum(o["n_tiles"] for o in outcomes)
                    info = {"arguments": {}, "slides": outcomes, "status": "running"}
                    with atomic_write(store / "run.json") as tmp:
                        tmp.write_bytes(json.dumps(info, indent=1).encode())
                else:
                    log.write(json.dumps(outcome) + "\n")
                    log.flush()
                times.append(time.perf_counter() - t)
            if log is not None:
                log.close()
        return times, opened

    first, open_first = run(Path(path) / "empty.zarr", 0)
    late, open_late = run(Path(path) / "full.zarr", n_slides)
    return {"first_s": float(np.median(first)), "late_s": float(np.median(late)),
            "open_empty_s": open_first, "open_full_s": open_late}  # fmt: skip
