"""The ingest run: plans and tile reads in a pool, one writer committing slide by slide."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from scratchpath.errors import ScratchpathError
from scratchpath.files import atomic_write
from scratchpath.ingest.identity import find_slides, select_shard, slide_sha256
from scratchpath.ingest.plan import Grid, SlidePlan, TilingOptions, plan_slide, set_complete
from scratchpath.ingest.tiles import read_tiles

CHUNK_TILES = 64  # tiles per worker job: large enough to amortise opening the slide


class SlideOutcomes:
    """What a per-slide run report (:class:`IngestReport`, ``embed``'s ``EmbedReport``) says of
    its ``slides``: one dict per slide with a ``status`` of ``ok``, ``skipped`` or ``failed``."""

    slides: list[dict]

    def count(self, status: str) -> int:
        """How many slides ended with ``status``."""
        return sum(s["status"] == status for s in self.slides)

    @property
    def failed(self) -> list[dict]:
        return [s for s in self.slides if s["status"] == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class IngestReport(SlideOutcomes):
    """Outcome of :func:`ingest`: one entry per slide in ``slides`` and totals."""

    store: str
    slides: list[dict]
    n_tiles: int
    seconds: float

    def summary(self) -> str:
        ok, skipped = self.count("ok"), self.count("skipped")
        return (
            f"{self.store}: {ok} slide(s) ingested ({self.n_tiles} tiles), {skipped} already in "
            f"the store, {len(self.failed)} failed [{self.seconds:.1f} s]"
        )


class InlineExecutor:
    """Executor stand-in running each job at submit time, in this process and thread (one worker
    of ``ingest``, ``workers=0`` of ``embed``): the same ``submit``/``shutdown`` as a pool, so the
    caller has one code path."""

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:
            future.set_exception(err)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def ingest(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    mpp: float | Sequence[float] = 0.5,
    tile_size: int = 224,
    min_tissue: float = 0.5,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
    assume_mpp: float | None = None,
    codec: str = "jpeg",
    quality: int = 90,
    progress: bool = True,
    on_failure: Callable[[str], None] | None = None,
) -> IngestReport:
    """Tile slides (files or folders of them) into the patch store ``out``.

    Args:
        paths: slide files and/or directories (searched recursively for slide suffixes).
        out: store folder, created or appended to (tile_size and codec must match).
        mpp: target µm per pixel of the stored tiles, or several (e.g. ``(0.25, 0.5, 1, 2)``),
            all cut in one pass over each slide.
        tile_size: tile edge in pixels.
        min_tissue: keep tiles whose tissue fraction (from the thumbnail mask) is at least this.
        workers: processes that plan slides and read/encode tiles (1 = all in this process).
        shard: ``(i, n)`` ingests only every n-th slide from the i-th on (SLURM arrays: one store
            per shard, opened together with ``PatchStore(a, b, ...)``).
        assume_mpp: µm/px for slides that record none.
        codec, quality: tile codec of a new store (see ``StoreWriter``).
        progress: show a tqdm bar on stderr (only when it is a terminal).
        on_failure: called with the one-line reason of each failed slide as it happens.

    Slides already in the store (same sha256) are skipped; failed slides are recorded in the
    store's slide table and in ``<out>/run.json`` and the others still ingest.
    """
    from tqdm import tqdm

    from scratchpath.store import StoreWriter

    mpps = tuple(dict.fromkeys(float(m) for m in np.atleast_1d(np.asarray(mpp, float))))
    if not mpps or not all(m > 0 for m in mpps):
        raise ScratchpathError(f"mpp: must be positive, got {mpp}")
    if tile_size < 8:
        raise ScratchpathError(f"tile_size: must be at least 8, got {tile_size}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ScratchpathError(f"min_tissue: must be within 0..1, got {min_tissue}")
    if workers < 1:
        raise ScratchpathError(f"workers: must be at least 1, got {workers}")
    slides = select_shard(find_slides(paths), shard)
    if not slides:
        raise ScratchpathError(f"{', '.join(map(str, paths)) or 'paths'}: no slide files found")
    options = TilingOptions(mpps[0] if len(mpps) == 1 else mpps, tile_size, min_tissue, assume_mpp)
    start = time.perf_counter()
    outcomes: list[dict] = []
    run_info = {
        "arguments": {"paths": [str(p) for p in paths], "out": str(out), "shard": shard,
                      "workers": workers, "codec": codec, "quality": quality, **asdict(options)},
        "status": "running",
    }  # fmt: skip
    bar = tqdm(total=len(slides), unit="slide", disable=not (progress and sys.stderr.isatty()))
    with StoreWriter(out, tile_size=tile_size, codec=codec, quality=quality) as writer:
        root = Path(writer.path)
        (root / "thumbnails").mkdir(exist_ok=True)
        complete, seen_ids = _committed(writer)
        pool = InlineExecutor() if workers == 1 else _spawn_pool(workers, complete)
        if workers == 1:
            set_complete(complete)
        _write_atomic(root / "run.json", json.dumps(run_info, indent=1).encode())
        log = open(root / "run.log.jsonl", "a")  # noqa: SIM115
        log.write(json.dumps({"run_started": time.time(), **run_info}) + "\n")
        plans: deque[Future] = deque()
        todo = iter(slides)
        n_tiles = 0
        try:
            for _ in range(workers + 1):
                _submit_next_plan(pool, todo, options, plans)
            while plans:
                plan: SlidePlan = plans.popleft().result()
                _submit_next_plan(pool, todo, options, plans)
                outcome = _ingest_one(pool, writer, plan, options, seen_ids, workers)
                outcomes.append(outcome)
                n_tiles += outcome["n_tiles"]
                if outcome["status"] == "failed" and on_failure is not None:
                    on_failure(outcome["reason"])
                bar.update(1)
                bar.set_postfix(tiles=n_tiles)
                log.write(json.dumps(outcome) + "\n")  # O(1) per slide; the commit is durable
                log.flush()
        finally:
            pool.shutdown(cancel_futures=True)
            bar.close()
            log.close()
            set_complete(frozenset())
        report = IngestReport(str(out), outcomes, n_tiles, time.perf_counter() - start)
        run_info.update(status="finished", summary=report.summary(), seconds=report.seconds,
                        slides=outcomes)  # fmt: skip
        _write_atomic(root / "run.json", json.dumps(run_info, indent=1).encode())
    return report


def _spawn_pool(workers: int, complete: frozenset[str]) -> ProcessPoolExecutor:
    import multiprocessing

    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=set_complete,
        initargs=(complete,),
    )


def _committed(writer) -> tuple[frozenset[str], set[str]]:
    """Fast identities and slide ids of the slides already committed to the store."""
    # Workers skip the tiling work of committed slides; the writer's is_complete is checked
    # again before writing (which also catches the same file listed twice in one run).
    ok = [s for s in writer.slides if s.get("status") == "ok"]
    return frozenset(s["fast_id"] for s in ok if s.get("fast_id")), {s["slide_id"] for s in ok}


def _submit_next_plan(pool, todo, options, plans: deque) -> None:
    path = next(todo, None)
    if path is not None:
        plans.append(pool.submit(plan_slide, str(path), options, None))


def _ingest_one(pool, writer, plan: SlidePlan, options, seen_ids: set, workers: int) -> dict:
    """Write one planned slide (its tiles read by the pool), or record why it failed."""
    record = dict(plan.record)
    outcome = {"source": plan.path, "slide_id": record["slide_id"], "n_tiles": 0}
    if plan.status == "skipped" or (
        plan.status == "planned" and writer.is_complete(record.get("fast_id", "-"))
    ):
        return {**outcome, "status": "skipped", "reason": "already in the store"}
    if record["slide_id"] in seen_ids:  # same file name in two folders, or a changed file
        digest = record.get("fast_id", "").rsplit(":", 1)[-1]
        record["slide_id"] = f"{record['slide_id']}-{digest[:8]}"
    seen_ids.add(record["slide_id"])
    outcome["slide_id"] = record["slide_id"]
    if plan.thumbnail_png:
        _write_atomic(writer.path / "thumbnails" / f"{record['slide_id']}.png", plan.thumbnail_png)
    if plan.status == "failed":
        writer.record_failure({"sha256": "", **record}, plan.reason)
        return {**outcome, "status": "failed", "reason": plan.reason}
    levels = _per_grid(plan.grids, lambda g: g.level)
    tile_mpps = _per_grid(plan.grids, lambda g: g.stored_mpp)
    record.update(level=levels, tile_mpp=tile_mpps, target_mpp=options.mpp)
    if len(plan.grids) > 1:
        record["tiles_per_mpp"] = {f"{g.target_mpp:g}": len(g.xy) for g in plan.grids}
    # (grid, first tile) of every chunk: all µm/px of the slide, one after the other.
    chunks = [(g, first) for g in plan.grids for first in range(0, len(g.xy), CHUNK_TILES)]
    pending: deque[tuple[Future, Grid, int]] = deque()
    submitted = 0
    # The one full read for the sha256, in the pool beside the tile reads.
    sha256 = pool.submit(slide_sha256, plan.path)
    slide_writer = writer.begin_slide(record)
    try:
        while submitted < len(chunks) or pending:
            while submitted < len(chunks) and len(pending) < 2 * workers:
                grid, first = chunks[submitted]
                xy = grid.xy[first : first + CHUNK_TILES]
                job = (read_tiles, plan.path, options, grid.level, grid.read_size, xy, writer.codec)
                pending.append((pool.submit(*job), grid, first))
                submitted += 1
            future, grid, first = pending.popleft()
            _add_chunk(slide_writer, future.result(), first, grid)
        record["sha256"] = sha256.result()
        if writer.is_complete(record["sha256"]):  # the same bytes under another name or time
            slide_writer.abort()
            return {**outcome, "status": "skipped", "reason": "same content already in the store"}
        slide_writer.update_record(sha256=record["sha256"])
        slide_writer.commit()
    except Exception as err:
        slide_writer.abort()
        for future, _, _ in pending:
            future.cancel()
        reason = str(err) if isinstance(err, ScratchpathError) else f"{plan.path}: {err!r}"
        writer.record_failure(record, reason)
        return {**outcome, "status": "failed", "reason": reason}
    extra = {"tiles_per_mpp": record["tiles_per_mpp"]} if "tiles_per_mpp" in record else {}
    return {**outcome, "status": "ok", "reason": "", "n_tiles": plan.n_tiles,
            "level": levels, "tile_mpp": tile_mpps, **extra}  # fmt: skip


def _per_grid(grids: list[Grid], value: Callable[[Grid], float]):
    """One grid's value as is, several grids' as a list (the single-µm/px records unchanged)."""
    return value(grids[0]) if len(grids) == 1 else [value(g) for g in grids]


def _add_chunk(slide_writer, blobs: list[bytes], first: int, grid: Grid) -> None:
    n = len(blobs)
    xy = grid.xy[first : first + n]
    slide_writer.add_encoded(
        blobs,
        x=xy[:, 0],
        y=xy[:, 1],
        level=np.full(n, grid.level),
        mpp=np.full(n, grid.stored_mpp),
        tissue_fraction=grid.fractions[first : first + n],
    )
